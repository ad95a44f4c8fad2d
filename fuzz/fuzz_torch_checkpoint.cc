// libFuzzer target: a whole torch.save checkpoint (zip + data.pkl + storages) through
// open_torch_checkpoint, reading every tensor's bytes. Only tensors or moetrace::Error may come
// out.
#include <cstddef>
#include <cstdint>

#include "core/error.h"
#include "core/log.h"
#include "fuzz_file.h"
#include "io/checkpoint.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  moetrace::set_log_level(moetrace::LogLevel::kOff);
  const auto path = moetrace::fuzz::write_input("pytorch_model.bin", data, size);
  try {
    auto src = moetrace::open_torch_checkpoint(path);
    for (const std::string& name : src->names()) {
      const moetrace::CheckpointTensor* t = src->find(name);
      if (t == nullptr) __builtin_trap();
      (void)moetrace::fuzz::touch(t->view.data, t->view.nbytes());
    }
  } catch (const moetrace::Error&) {
  }
  return 0;
}
