#include "core/sha256.h"

#include <openssl/evp.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <vector>

#include "core/error.h"

namespace moetrace {

namespace {
EVP_MD_CTX* ctx_of(void* p) { return static_cast<EVP_MD_CTX*>(p); }
}  // namespace

Sha256::Sha256() : ctx_(EVP_MD_CTX_new()) {
  if (ctx_ == nullptr || EVP_DigestInit_ex(ctx_of(ctx_), EVP_sha256(), nullptr) != 1) {
    EVP_MD_CTX_free(ctx_of(ctx_));
    fail("OpenSSL: cannot initialise SHA-256");
  }
}

Sha256::~Sha256() { EVP_MD_CTX_free(ctx_of(ctx_)); }

void Sha256::update(const void* data, size_t n) {
  if (n > 0 && EVP_DigestUpdate(ctx_of(ctx_), data, n) != 1) fail("OpenSSL: SHA-256 update failed");
}

std::string Sha256::hex_digest() {
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  if (EVP_DigestFinal_ex(ctx_of(ctx_), md, &len) != 1) fail("OpenSSL: SHA-256 final failed");
  static const char kHex[] = "0123456789abcdef";
  std::string out(2 * len, '0');
  for (unsigned int i = 0; i < len; ++i) {
    out[2 * i] = kHex[md[i] >> 4];
    out[2 * i + 1] = kHex[md[i] & 15];
  }
  return out;
}

std::string sha256_hex(const void* data, size_t n) {
  Sha256 h;
  h.update(data, n);
  return h.hex_digest();
}

std::string sha256_file(const std::filesystem::path& path) {
  FILE* fp = std::fopen(path.c_str(), "rb");
  if (fp == nullptr) fail(path.string(), ": cannot open: ", std::strerror(errno));
  Sha256 h;
  std::vector<char> buf(1 << 20);
  while (true) {
    const size_t n = std::fread(buf.data(), 1, buf.size(), fp);
    h.update(buf.data(), n);
    if (n < buf.size()) break;
  }
  const bool bad = std::ferror(fp) != 0;
  const int err = errno;
  std::fclose(fp);
  if (bad) fail(path.string(), ": read failed: ", std::strerror(err));
  return h.hex_digest();
}

}  // namespace moetrace
