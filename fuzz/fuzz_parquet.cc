// libFuzzer target: a Parquet file of arbitrary bytes through the record reader (all columns).
// It may skip rows or throw moetrace::Error; a crash, hang, other exception or a huge allocation
// (libFuzzer's -rss_limit_mb) is a bug.
#include <cstddef>
#include <cstdint>

#include "core/error.h"
#include "core/log.h"
#include "data/records.h"
#include "fuzz_file.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  moetrace::set_log_level(moetrace::LogLevel::kOff);
  using namespace moetrace::data;
  const auto path = moetrace::fuzz::write_input("input.parquet", data, size);
  ReadOptions o;
  o.format = Format::kParquet;
  o.max_record_bytes = 1 << 16;
  try {
    auto reader = open_records(path, o);
    Record r;
    for (int n = 0; n < 100000 && reader->next(&r); ++n) {
    }
  } catch (const moetrace::Error&) {
  }
  return 0;
}
