// libFuzzer target: a trace store of one manifest and one shard, the input being
// [u32 little-endian manifest length][manifest.json][shard-00000.safetensors]
// (scripts/make_fuzz_seeds.py writes seeds of this form). Runs verify_store, the summary of
// `inspect` and TraceStore sample reads; only results or moetrace::Error may come out.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <sstream>

#include "core/error.h"
#include "core/log.h"
#include "fuzz_file.h"
#include "trace/store.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  moetrace::set_log_level(moetrace::LogLevel::kOff);
  if (size < 4) return 0;
  uint32_t n = 0;
  std::memcpy(&n, data, 4);
  data += 4;
  size -= 4;
  if (n > size) n = static_cast<uint32_t>(size);
  const auto dir = moetrace::fuzz::scratch_dir() / "store";
  std::filesystem::create_directories(dir);
  moetrace::fuzz::write_input("store/manifest.json", data, n);
  moetrace::fuzz::write_input("store/shard-00000.safetensors", data + n, size - n);
  (void)moetrace::verify_store(dir);
  try {
    std::ostringstream os;
    moetrace::print_store_summary(dir, os);
  } catch (const moetrace::Error&) {
  }
  try {
    const moetrace::TraceStore store = moetrace::TraceStore::open(dir);
    for (int64_t i = 0; i < store.num_samples() && i < 16; ++i) (void)store.sample(i);
  } catch (const moetrace::Error&) {
  }
  return 0;
}
