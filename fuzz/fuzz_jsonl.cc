// libFuzzer target: the JSON Lines / JSON array reader on arbitrary bytes (plain, gzip or zstd).
// It may skip rows or throw moetrace::Error for an unusable input; anything else is a bug.
#include <cstddef>
#include <cstdint>
#include <string>

#include "core/error.h"
#include "core/log.h"
#include "data/records.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  moetrace::set_log_level(moetrace::LogLevel::kOff);
  using namespace moetrace::data;
  ReadOptions o;
  o.format = Format::kJsonLines;
  o.max_record_bytes = 4096;
  try {
    auto reader = open_records_from_memory(std::string(reinterpret_cast<const char*>(data), size),
                                           "fuzz.jsonl", o);
    Record r;
    while (reader->next(&r)) {
      (void)r.fields.dump();
    }
  } catch (const moetrace::Error&) {
  }
  return 0;
}
