// Sequential byte input for the text-based readers: a file or a memory buffer, transparently
// gzip- or zstd-decompressed (detected from the magic bytes, not the name). Nothing is loaded
// whole.
#pragma once

#include <cstddef>
#include <filesystem>
#include <memory>
#include <string>

namespace moetrace::data {

class ByteStream {
 public:
  virtual ~ByteStream() = default;
  // Up to n bytes into buf; 0 at the end. Throws Error (naming the source) on corrupt input.
  virtual size_t read(char* buf, size_t n) = 0;
};

std::unique_ptr<ByteStream> open_byte_stream(const std::filesystem::path& path);
// `name` is used in error messages only.
std::unique_ptr<ByteStream> memory_byte_stream(std::string bytes, std::string name);

// Latin-1 bytes of `inner` as UTF-8 (each byte >= 0x80 becomes two).
std::unique_ptr<ByteStream> latin1_to_utf8(std::unique_ptr<ByteStream> inner);

// Buffered one-byte-at-a-time access on top of a ByteStream, for the parsers.
class BufferedInput {
 public:
  explicit BufferedInput(std::unique_ptr<ByteStream> stream) : stream_(std::move(stream)) {}
  // Next byte (0..255) or -1 at the end.
  int get() {
    if (pos_ == end_ && !refill()) return -1;
    return static_cast<unsigned char>(buf_[pos_++]);
  }
  int peek() {
    if (pos_ == end_ && !refill()) return -1;
    return static_cast<unsigned char>(buf_[pos_]);
  }
  // Drops a UTF-8 byte order mark at the current position.
  void skip_bom();

 private:
  bool refill();
  std::unique_ptr<ByteStream> stream_;
  std::unique_ptr<char[]> buf_ = std::make_unique<char[]>(kSize);
  size_t pos_ = 0, end_ = 0;
  static constexpr size_t kSize = 1 << 16;
};

}  // namespace moetrace::data
