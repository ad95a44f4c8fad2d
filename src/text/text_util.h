// Helpers shared by the tokenizers of src/text (internal to the folder).
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>
#include <string_view>

namespace moetrace::text {

// The bytes of a file; error naming it (and `what`, e.g. "the SentencePiece model") when it cannot
// be read.
std::string read_file_bytes(const std::filesystem::path& path, std::string_view what);

// Lower-case hex sha256 of bytes.
std::string hex_sha256(std::string_view bytes);

// Length in bytes of the UTF-8 sequence that starts with lead byte c (1 for invalid lead bytes).
inline size_t utf8_length(unsigned char c) {
  if (c < 0x80) return 1;
  if ((c >> 5) == 0x6) return 2;
  if ((c >> 4) == 0xe) return 3;
  if ((c >> 3) == 0x1e) return 4;
  return 1;
}

// Appends code point cp as UTF-8.
void append_utf8(std::string& out, char32_t cp);

// bytes as UTF-8 with each invalid sequence replaced by U+FFFD, the way Rust's
// String::from_utf8_lossy (and so Hugging Face `tokenizers`' decoders) replaces them: one U+FFFD
// per maximal prefix of a valid sequence.
std::string utf8_lossy(std::string_view bytes);

// True when bytes is valid UTF-8.
bool utf8_valid(std::string_view bytes);

}  // namespace moetrace::text
