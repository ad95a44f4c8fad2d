// libFuzzer target: a model's JSON files. The first byte picks config.json (parse_config) or a
// checkpoint index (model.safetensors.index.json / pytorch_model.bin.index.json, whose shard
// files are absent or this same input). Only a config, a source or moetrace::Error may come out.
#include <cstddef>
#include <cstdint>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/log.h"
#include "fuzz_file.h"
#include "io/checkpoint.h"
#include "model/config.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  moetrace::set_log_level(moetrace::LogLevel::kOff);
  if (size == 0) return 0;
  const uint8_t mode = data[0] % 3;
  ++data;
  --size;
  try {
    if (mode == 0) {
      const auto path = moetrace::fuzz::write_input("config.json", data, size);
      (void)moetrace::load_config(path);
    } else if (mode == 1) {
      const auto path = moetrace::fuzz::write_input("model.safetensors.index.json", data, size);
      (void)moetrace::open_safetensors_index(path);
    } else {
      const auto path = moetrace::fuzz::write_input("pytorch_model.bin.index.json", data, size);
      (void)moetrace::open_torch_index(path);
    }
  } catch (const moetrace::Error&) {
  }
  return 0;
}
