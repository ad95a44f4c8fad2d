#include "data/byte_stream.h"

#include <zlib.h>
#include <zstd.h>

#include <cstdio>
#include <cstring>
#include <vector>

#include "core/error.h"

namespace moetrace::data {

namespace {

class FileStream : public ByteStream {
 public:
  explicit FileStream(const std::filesystem::path& path) : name_(path.string()) {
    f_ = std::fopen(name_.c_str(), "rb");
    if (!f_) fail(name_, ": cannot open (", std::strerror(errno), ")");
  }
  ~FileStream() override { std::fclose(f_); }
  size_t read(char* buf, size_t n) override {
    size_t got = std::fread(buf, 1, n, f_);
    if (got < n && std::ferror(f_)) fail(name_, ": read error");
    return got;
  }

 private:
  std::string name_;
  std::FILE* f_ = nullptr;
};

class MemoryStream : public ByteStream {
 public:
  explicit MemoryStream(std::string bytes) : bytes_(std::move(bytes)) {}
  size_t read(char* buf, size_t n) override {
    size_t k = std::min(n, bytes_.size() - pos_);
    std::memcpy(buf, bytes_.data() + pos_, k);
    pos_ += k;
    return k;
  }

 private:
  std::string bytes_;
  size_t pos_ = 0;
};

// Replays already-read header bytes before the rest of the inner stream.
class PrefixedStream : public ByteStream {
 public:
  PrefixedStream(std::string prefix, std::unique_ptr<ByteStream> inner)
      : prefix_(std::move(prefix)), inner_(std::move(inner)) {}
  size_t read(char* buf, size_t n) override {
    if (pos_ < prefix_.size()) {
      size_t k = std::min(n, prefix_.size() - pos_);
      std::memcpy(buf, prefix_.data() + pos_, k);
      pos_ += k;
      return k;
    }
    return inner_->read(buf, n);
  }

 private:
  std::string prefix_;
  size_t pos_ = 0;
  std::unique_ptr<ByteStream> inner_;
};

constexpr size_t kChunk = 1 << 16;

// gzip (one or more concatenated members).
class GzipStream : public ByteStream {
 public:
  GzipStream(std::unique_ptr<ByteStream> inner, std::string name)
      : inner_(std::move(inner)), name_(std::move(name)), in_(kChunk) {
    std::memset(&z_, 0, sizeof(z_));
    if (inflateInit2(&z_, 16 + MAX_WBITS) != Z_OK) fail(name_, ": zlib init failed");
  }
  ~GzipStream() override { inflateEnd(&z_); }
  size_t read(char* buf, size_t n) override {
    z_.next_out = reinterpret_cast<Bytef*>(buf);
    z_.avail_out = static_cast<uInt>(n);
    while (z_.avail_out == n && !done_) {
      if (z_.avail_in == 0) {
        size_t got = inner_->read(in_.data(), in_.size());
        if (got == 0) {
          if (in_member_) fail(name_, ": truncated gzip data");
          done_ = true;
          break;
        }
        z_.next_in = reinterpret_cast<Bytef*>(in_.data());
        z_.avail_in = static_cast<uInt>(got);
      }
      in_member_ = true;
      int rc = inflate(&z_, Z_NO_FLUSH);
      if (rc == Z_STREAM_END) {
        in_member_ = false;
        inflateReset(&z_);
      } else if (rc != Z_OK && rc != Z_BUF_ERROR) {
        fail(name_, ": corrupt gzip data (", z_.msg ? z_.msg : "zlib error", ")");
      }
    }
    return n - z_.avail_out;
  }

 private:
  std::unique_ptr<ByteStream> inner_;
  std::string name_;
  std::vector<char> in_;
  z_stream z_;
  bool in_member_ = false, done_ = false;
};

class ZstdStream : public ByteStream {
 public:
  ZstdStream(std::unique_ptr<ByteStream> inner, std::string name)
      : inner_(std::move(inner)), name_(std::move(name)), in_(kChunk) {
    d_ = ZSTD_createDStream();
    if (!d_) fail(name_, ": zstd init failed");
    ZSTD_initDStream(d_);
  }
  ~ZstdStream() override { ZSTD_freeDStream(d_); }
  size_t read(char* buf, size_t n) override {
    ZSTD_outBuffer out{buf, n, 0};
    while (out.pos == 0 && !done_) {
      if (inb_.pos == inb_.size) {
        size_t got = inner_->read(in_.data(), in_.size());
        if (got == 0) {
          if (pending_) fail(name_, ": truncated zstd data");
          done_ = true;
          break;
        }
        inb_ = ZSTD_inBuffer{in_.data(), got, 0};
      }
      size_t rc = ZSTD_decompressStream(d_, &out, &inb_);
      if (ZSTD_isError(rc)) fail(name_, ": corrupt zstd data (", ZSTD_getErrorName(rc), ")");
      pending_ = rc != 0;
    }
    return out.pos;
  }

 private:
  std::unique_ptr<ByteStream> inner_;
  std::string name_;
  std::vector<char> in_;
  ZSTD_DStream* d_ = nullptr;
  ZSTD_inBuffer inb_{nullptr, 0, 0};
  bool pending_ = false, done_ = false;
};

std::unique_ptr<ByteStream> decompressing(std::unique_ptr<ByteStream> raw,
                                          const std::string& name) {
  char magic[4];
  size_t n = 0;
  while (n < 4) {
    size_t got = raw->read(magic + n, 4 - n);
    if (got == 0) break;
    n += got;
  }
  std::string prefix(magic, n);
  auto replay = std::make_unique<PrefixedStream>(prefix, std::move(raw));
  if (n >= 2 && static_cast<unsigned char>(magic[0]) == 0x1f &&
      static_cast<unsigned char>(magic[1]) == 0x8b) {
    return std::make_unique<GzipStream>(std::move(replay), name);
  }
  if (n == 4 && prefix == std::string("\x28\xb5\x2f\xfd", 4)) {
    return std::make_unique<ZstdStream>(std::move(replay), name);
  }
  return replay;
}

}  // namespace

std::unique_ptr<ByteStream> open_byte_stream(const std::filesystem::path& path) {
  return decompressing(std::make_unique<FileStream>(path), path.string());
}

std::unique_ptr<ByteStream> memory_byte_stream(std::string bytes, std::string name) {
  return decompressing(std::make_unique<MemoryStream>(std::move(bytes)), name);
}

namespace {

class Latin1Stream : public ByteStream {
 public:
  explicit Latin1Stream(std::unique_ptr<ByteStream> inner) : inner_(std::move(inner)) {}
  size_t read(char* buf, size_t n) override {
    if (pos_ == out_.size()) {
      out_.clear();
      pos_ = 0;
      char in[kChunk / 2];
      const size_t got = inner_->read(in, sizeof(in));
      for (size_t i = 0; i < got; ++i) {
        const auto c = static_cast<unsigned char>(in[i]);
        if (c < 0x80) {
          out_ += static_cast<char>(c);
        } else {
          out_ += static_cast<char>(0xC0 | (c >> 6));
          out_ += static_cast<char>(0x80 | (c & 0x3F));
        }
      }
    }
    const size_t k = std::min(n, out_.size() - pos_);
    std::memcpy(buf, out_.data() + pos_, k);
    pos_ += k;
    return k;
  }

 private:
  std::unique_ptr<ByteStream> inner_;
  std::string out_;  // transcoded, not yet returned from pos_ on
  size_t pos_ = 0;
};

}  // namespace

std::unique_ptr<ByteStream> latin1_to_utf8(std::unique_ptr<ByteStream> inner) {
  return std::make_unique<Latin1Stream>(std::move(inner));
}

bool BufferedInput::refill() {
  pos_ = 0;
  end_ = stream_->read(buf_.get(), kSize);
  return end_ > 0;
}

void BufferedInput::skip_bom() {
  // Needs three bytes; they are all in the buffer when the stream is at its very start.
  if (pos_ == end_ && !refill()) return;
  if (end_ - pos_ >= 3 && std::memcmp(buf_.get() + pos_, "\xEF\xBB\xBF", 3) == 0) pos_ += 3;
}

}  // namespace moetrace::data
