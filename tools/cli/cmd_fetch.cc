// `moetrace fetch [--model ID]... [--datasets SELECTION] ...`: downloads into the Hugging Face hub
// cache exactly the files collect reads. The download is huggingface_hub's (python/moetrace/
// fetch.py, docs/FETCH.md); this subcommand hands every argument to it unchanged.
#include "command.h"
#include "python_bridge.h"

namespace moetrace::cli {

namespace {

RegisterCommand reg([](CLI::App& app) {
  add_python_subcommand(
      app, "fetch",
      "Download a model and catalog datasets into the Hugging Face cache that collect reads: only "
      "the files collect needs (Python + huggingface_hub, see `moetrace fetch --help`)");
});

}  // namespace
}  // namespace moetrace::cli
