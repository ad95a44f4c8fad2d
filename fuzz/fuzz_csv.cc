// libFuzzer target: the CSV/TSV reader on arbitrary bytes (plain, gzip or zstd). It may skip rows
// or throw moetrace::Error for an unusable input; anything else (crash, hang, other exception) is a
// bug.
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
  // The first byte picks the dialect so the corpus explores all of them.
  const uint8_t mode = data[0];
  o.format = (mode & 1) ? Format::kTsv : Format::kCsv;
  o.header = (mode & 2) ? Header::kNo : Header::kAuto;
  o.header_hints = {"text", "label"};
  if (mode & 4) o.quote = '"';
  if (mode & 8) o.columns = {"label", "text"};
  o.max_record_bytes = 4096;
  std::string bytes(reinterpret_cast<const char*>(data) + 1, size - 1);
  try {
    auto reader = open_records_from_memory(std::move(bytes), "fuzz.csv", o);
    Record r;
    while (reader->next(&r)) {
    }
  } catch (const moetrace::Error&) {
  }
  return 0;
}
