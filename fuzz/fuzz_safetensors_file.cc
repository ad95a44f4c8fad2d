// libFuzzer target: a whole safetensors file through SafetensorsFile::open (header, offsets,
// mapping), reading every tensor's bytes. Only tensors or moetrace::Error may come out.
#include <cstddef>
#include <cstdint>

#include "core/error.h"
#include "fuzz_file.h"
#include "io/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const auto path = moetrace::fuzz::write_input("model.safetensors", data, size);
  try {
    const moetrace::SafetensorsFile f = moetrace::SafetensorsFile::open(path);
    for (const moetrace::NamedView& t : f.tensors()) {
      (void)moetrace::fuzz::touch(t.view.data, t.view.nbytes());
    }
  } catch (const moetrace::Error&) {
  }
  return 0;
}
