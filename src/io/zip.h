// A reader for the central directory of a zip archive held in memory (a mapped file), as far as
// torch.save checkpoints need it: stored (uncompressed) entries, ZIP64 sizes and offsets, no
// encryption, one disk. Every offset is checked against the archive size before it is used.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <string_view>
#include <vector>

namespace moetrace {

struct ZipEntry {
  std::string name;
  uint16_t method = 0;  // 0 = stored, 8 = deflate, ...
  uint16_t flags = 0;   // bit 0: encrypted
  uint32_t crc32 = 0;
  uint64_t compressed_size = 0;
  uint64_t size = 0;         // uncompressed size
  uint64_t data_offset = 0;  // of the entry's bytes in the archive (past its local header)
};

class ZipArchive {
 public:
  // Parses the end-of-central-directory record (and its ZIP64 form), the central directory and
  // every entry's local header. `what` names the archive in errors. Throws Error on anything
  // malformed.
  static ZipArchive read(const std::byte* data, size_t size, const std::string& what);

  const std::vector<ZipEntry>& entries() const { return entries_; }
  // nullptr when absent.
  const ZipEntry* find(std::string_view name) const;
  // The bytes of a stored entry (pointing into the archive). Throws Error naming the entry when it
  // is compressed or encrypted.
  std::string_view stored(const ZipEntry& e) const;

 private:
  const std::byte* data_ = nullptr;
  size_t size_ = 0;
  std::string what_;
  std::vector<ZipEntry> entries_;
  std::map<std::string, size_t, std::less<>> by_name_;
};

// CRC-32 (ISO 3309, the zip checksum).
uint32_t crc32(const void* data, size_t n, uint32_t crc = 0);

}  // namespace moetrace
