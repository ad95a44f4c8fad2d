// libFuzzer target: the zip central-directory reader (torch.save's container) on arbitrary bytes:
// every entry it lists must lie inside the archive, and stored() must return bytes inside it.
#include <cstddef>
#include <cstdint>
#include <vector>

#include "core/error.h"
#include "io/zip.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  // A copy of exactly `size` bytes, so ASan catches any read past the end.
  std::vector<std::byte> bytes(reinterpret_cast<const std::byte*>(data),
                               reinterpret_cast<const std::byte*>(data) + size);
  try {
    const moetrace::ZipArchive zip =
        moetrace::ZipArchive::read(bytes.data(), bytes.size(), "fuzz.zip");
    for (const moetrace::ZipEntry& e : zip.entries()) {
      if (e.data_offset > size || e.compressed_size > size - e.data_offset) __builtin_trap();
      if (zip.find(e.name) == nullptr) __builtin_trap();
      try {
        const std::string_view s = zip.stored(e);
        (void)moetrace::crc32(s.data(), s.size());
      } catch (const moetrace::Error&) {
      }
    }
  } catch (const moetrace::Error&) {
  }
  return 0;
}
