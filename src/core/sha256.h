// SHA-256 (through OpenSSL's EVP interface) of bytes and files, as lowercase hex.
#pragma once

#include <cstddef>
#include <filesystem>
#include <string>

namespace moetrace {

// Incremental hashing: update() any number of times, then hex_digest() once.
class Sha256 {
 public:
  Sha256();
  ~Sha256();
  Sha256(const Sha256&) = delete;
  Sha256& operator=(const Sha256&) = delete;

  void update(const void* data, size_t n);
  std::string hex_digest();  // 64 lowercase hex digits; the object cannot be updated afterwards

 private:
  void* ctx_;  // EVP_MD_CTX*
};

std::string sha256_hex(const void* data, size_t n);
// Reads the file in blocks; throws Error naming the file when it cannot be read.
std::string sha256_file(const std::filesystem::path& path);

}  // namespace moetrace
