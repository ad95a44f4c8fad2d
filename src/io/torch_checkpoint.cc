// Placeholder until the torch zip reader lands.
#include "core/error.h"
#include "io/checkpoint.h"

namespace moetrace {
std::unique_ptr<TensorSource> open_torch_checkpoint(const std::filesystem::path& file) {
  fail(file.string(), ": PyTorch checkpoints are not supported yet");
}
}  // namespace moetrace
