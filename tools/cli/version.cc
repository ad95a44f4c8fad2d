// `moetrace --version`: the version, the commit it was built from, whether the CUDA engine is
// compiled in, and the versions of the libraries that read data (Arrow) and tokenize
// (SentencePiece), so that a bug report carries them.
#include <arrow/config.h>

#include <string>

#include "command.h"
#include "version_info.h"

namespace moetrace::cli {

std::string version_text() {
  std::string s = "moetrace " MOETRACE_VERSION "\n";
  s += "commit         " MOETRACE_GIT_DESCRIBE "\n";
  s += "cuda           " MOETRACE_CUDA_INFO "\n";
  s += "arrow          " + arrow::GetBuildInfo().version_string + "\n";
  s += "sentencepiece  " MOETRACE_SENTENCEPIECE_VERSION;
  return s;
}

}  // namespace moetrace::cli
