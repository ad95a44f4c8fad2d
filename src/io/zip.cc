#include "io/zip.h"

#include <array>

#include "core/error.h"

namespace moetrace {

namespace {

constexpr uint32_t kLocalHeaderSig = 0x04034b50;
constexpr uint32_t kCentralHeaderSig = 0x02014b50;
constexpr uint32_t kEndSig = 0x06054b50;
constexpr uint32_t kEnd64Sig = 0x06064b50;
constexpr uint32_t kEnd64LocatorSig = 0x07064b50;
constexpr size_t kEndSize = 22;
constexpr size_t kEnd64Size = 56;
constexpr size_t kEnd64LocatorSize = 20;
constexpr size_t kCentralHeaderSize = 46;
constexpr size_t kLocalHeaderSize = 30;
constexpr uint16_t kZip64ExtraId = 0x0001;

// Little-endian field reads from a range already checked to hold them.
uint64_t le(const std::byte* p, int n) {
  uint64_t v = 0;
  for (int k = 0; k < n; ++k) v |= uint64_t{static_cast<uint8_t>(p[k])} << (8 * k);
  return v;
}

// Whether [offset, offset + n) lies inside [0, size), without overflow.
bool inside(uint64_t offset, uint64_t n, uint64_t size) {
  return offset <= size && n <= size - offset;
}

}  // namespace

uint32_t crc32(const void* data, size_t n, uint32_t crc) {
  static const std::array<uint32_t, 256> table = [] {
    std::array<uint32_t, 256> t{};
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = (c & 1) ? 0xedb88320u ^ (c >> 1) : c >> 1;
      t[i] = c;
    }
    return t;
  }();
  const auto* p = static_cast<const uint8_t*>(data);
  crc = ~crc;
  for (size_t i = 0; i < n; ++i) crc = table[(crc ^ p[i]) & 0xff] ^ (crc >> 8);
  return ~crc;
}

ZipArchive ZipArchive::read(const std::byte* data, size_t size, const std::string& what) {
  ZipArchive z;
  z.data_ = data;
  z.size_ = size;
  z.what_ = what;
  if (size < kEndSize) fail(what, ": not a zip archive (", size, " bytes; truncated?)");

  // The end record sits in the last 22 + 65535 (comment) bytes; take the last one whose comment
  // length agrees with where it ends.
  size_t end = size;
  const size_t lowest = size > kEndSize + 0xffff ? size - kEndSize - 0xffff : 0;
  for (size_t p = size - kEndSize + 1; p-- > lowest;) {
    if (le(data + p, 4) == kEndSig && p + kEndSize + le(data + p + 20, 2) <= size) {
      end = p;
      break;
    }
  }
  if (end == size)
    fail(what, ": not a zip archive (no end-of-central-directory record; truncated?)");
  const std::byte* e = data + end;
  if (le(e + 4, 2) != 0 || le(e + 6, 2) != 0)
    fail(what, ": multi-disk zip archives are not supported");
  uint64_t count = le(e + 10, 2);
  uint64_t cd_size = le(e + 12, 4);
  uint64_t cd_offset = le(e + 16, 4);
  uint64_t cd_limit = end;  // the central directory ends before the end record(s)

  // ZIP64: a locator right before the end record points to the 64-bit end record.
  if (end >= kEnd64LocatorSize && le(data + end - kEnd64LocatorSize, 4) == kEnd64LocatorSig) {
    const std::byte* loc = data + end - kEnd64LocatorSize;
    const uint64_t end64 = le(loc + 8, 8);
    if (!inside(end64, kEnd64Size, end - kEnd64LocatorSize) || le(data + end64, 4) != kEnd64Sig) {
      fail(what, ": ZIP64 end record offset ", end64, " is not inside the archive (", size,
           " bytes)");
    }
    const std::byte* e64 = data + end64;
    if (le(e64 + 16, 4) != 0 || le(e64 + 20, 4) != 0)
      fail(what, ": multi-disk zip archives are not supported");
    count = le(e64 + 32, 8);
    cd_size = le(e64 + 40, 8);
    cd_offset = le(e64 + 48, 8);
    cd_limit = end64;
  } else if (count == 0xffff || cd_size == 0xffffffffu || cd_offset == 0xffffffffu) {
    fail(what, ": ZIP64 archive without its ZIP64 end record (truncated?)");
  }
  if (!inside(cd_offset, cd_size, cd_limit)) {
    fail(what, ": central directory [", cd_offset, ", +", cd_size,
         ") passes the end of the archive (", size, " bytes; truncated or corrupt)");
  }

  const uint64_t cd_end = cd_offset + cd_size;
  uint64_t p = cd_offset;
  for (uint64_t i = 0; i < count; ++i) {
    if (!inside(p, kCentralHeaderSize, cd_end) || le(data + p, 4) != kCentralHeaderSig) {
      fail(what, ": central directory entry ", i, " of ", count, " at offset ", p, " is corrupt");
    }
    const std::byte* h = data + p;
    ZipEntry entry;
    entry.flags = static_cast<uint16_t>(le(h + 8, 2));
    entry.method = static_cast<uint16_t>(le(h + 10, 2));
    entry.crc32 = static_cast<uint32_t>(le(h + 16, 4));
    entry.compressed_size = le(h + 20, 4);
    entry.size = le(h + 24, 4);
    const uint64_t name_len = le(h + 28, 2);
    const uint64_t extra_len = le(h + 30, 2);
    const uint64_t comment_len = le(h + 32, 2);
    const uint64_t disk = le(h + 34, 2);
    uint64_t local = le(h + 42, 4);
    const uint64_t total = kCentralHeaderSize + name_len + extra_len + comment_len;
    if (!inside(p, total, cd_end)) {
      fail(what, ": central directory entry ", i, " at offset ", p,
           " passes the end of the directory");
    }
    entry.name.assign(reinterpret_cast<const char*>(h + kCentralHeaderSize), name_len);

    // ZIP64 extra field: the 64-bit values of the fields set to all ones, in this order.
    const std::byte* x = h + kCentralHeaderSize + name_len;
    const std::byte* x_end = x + extra_len;
    while (x_end - x >= 4) {
      const uint64_t id = le(x, 2);
      const uint64_t len = le(x + 2, 2);
      if (static_cast<uint64_t>(x_end - x - 4) < len) {
        fail(what, ": entry '", entry.name, "': extra field passes the end of its header");
      }
      if (id == kZip64ExtraId) {
        const std::byte* f = x + 4;
        uint64_t left = len;
        auto take64 = [&](uint64_t* field) {
          if (left < 8) fail(what, ": entry '", entry.name, "': ZIP64 extra field is too short");
          *field = le(f, 8);
          f += 8;
          left -= 8;
        };
        if (entry.size == 0xffffffffu) take64(&entry.size);
        if (entry.compressed_size == 0xffffffffu) take64(&entry.compressed_size);
        if (local == 0xffffffffu) take64(&local);
      }
      x += 4 + len;
    }
    if (disk != 0 && disk != 0xffff) fail(what, ": multi-disk zip archives are not supported");

    // The local header repeats the name and has its own extra field (torch pads it to align data).
    if (!inside(local, kLocalHeaderSize, size) || le(data + local, 4) != kLocalHeaderSig) {
      fail(what, ": entry '", entry.name, "': local header at offset ", local,
           " is missing or outside the archive (", size, " bytes; truncated?)");
    }
    const uint64_t data_offset =
        local + kLocalHeaderSize + le(data + local + 26, 2) + le(data + local + 28, 2);
    if (!inside(data_offset, entry.compressed_size, size)) {
      fail(what, ": entry '", entry.name, "': data [", data_offset, ", +", entry.compressed_size,
           ") passes the end of the archive (", size, " bytes; truncated?)");
    }
    entry.data_offset = data_offset;
    if (!z.by_name_.emplace(entry.name, z.entries_.size()).second) {
      fail(what, ": entry '", entry.name, "' appears twice");
    }
    z.entries_.push_back(std::move(entry));
    p += total;
  }
  return z;
}

const ZipEntry* ZipArchive::find(std::string_view name) const {
  auto it = by_name_.find(name);
  return it == by_name_.end() ? nullptr : &entries_[it->second];
}

std::string_view ZipArchive::stored(const ZipEntry& e) const {
  if (e.flags & 1) fail(what_, ": entry '", e.name, "' is encrypted");
  if (e.method != 0) {
    fail(what_, ": entry '", e.name, "' is compressed (method ", e.method,
         "); torch.save stores entries uncompressed and moetrace reads only those");
  }
  if (e.compressed_size != e.size) {
    fail(what_, ": entry '", e.name, "' is stored but its sizes differ (", e.compressed_size,
         " vs ", e.size, ")");
  }
  return {reinterpret_cast<const char*>(data_ + e.data_offset), static_cast<size_t>(e.size)};
}

}  // namespace moetrace
