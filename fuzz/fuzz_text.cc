// libFuzzer target: the plain-text reader (lines or paragraphs, plain/gzip/zstd) on arbitrary
// bytes; the first byte picks the mode. Only records or moetrace::Error may come out.
#include <cstddef>
#include <cstdint>
#include <string>

#include "core/error.h"
#include "core/log.h"
#include "data/records.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  moetrace::set_log_level(moetrace::LogLevel::kOff);
  if (size == 0) return 0;
  using namespace moetrace::data;
  ReadOptions o;
  o.format = Format::kText;
  o.text_mode = (data[0] & 1) ? TextMode::kParagraphs : TextMode::kLines;
  o.max_record_bytes = 4096;
  std::string bytes(reinterpret_cast<const char*>(data) + 1, size - 1);
  try {
    auto reader = open_records_from_memory(std::move(bytes), "fuzz.txt", o);
    Record r;
    while (reader->next(&r)) {
    }
  } catch (const moetrace::Error&) {
  }
  return 0;
}
