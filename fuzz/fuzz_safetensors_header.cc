// libFuzzer: arbitrary bytes as a safetensors file (8-byte header length, JSON header, data
// region), validated the way SafetensorsFile::open does. Any outcome but a moetrace::Error is a
// bug.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <map>
#include <string>

#include "core/error.h"
#include "io/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 8) return 0;
  uint64_t header_len = 0;
  std::memcpy(&header_len, data, 8);
  if (header_len > size - 8) return 0;
  const std::string_view header(reinterpret_cast<const char*>(data) + 8, header_len);
  try {
    std::map<std::string, std::string> metadata;
    auto tensors =
        moetrace::SafetensorsFile::parse_header(header, size - 8 - header_len, "fuzz", &metadata);
    // What open() relies on: every region inside the data, sized by shape and dtype.
    for (const auto& [name, t] : tensors) {
      const auto& [view, span] = t;
      if (span.first > span.second || span.second > size - 8 - header_len) __builtin_trap();
      if (span.second - span.first != view.nbytes()) __builtin_trap();
    }
  } catch (const moetrace::Error&) {
  }
  return 0;
}
