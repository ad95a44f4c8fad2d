// The T5 SentencePiece tokenizer (unigram model `spiece.model`, 32000 pieces) with the
// special-token rules of transformers' T5Tokenizer: `<extra_id_N>` (id 32099 - N), `</s>` (1),
// `<pad>` (0) and
// `<unk>` (2) written literally in the text are matched first; the text between them goes through
// SentencePiece; `</s>` is appended. See shared SWITCH_SPEC.md "Tokenizer".
#pragma once

#include <cstdint>
#include <filesystem>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace moetrace {

class T5Tokenizer {
 public:
  static constexpr int32_t kPad = 0;
  static constexpr int32_t kEos = 1;
  static constexpr int32_t kUnk = 2;
  static constexpr int kExtraIds = 100;  // <extra_id_0> = 32099 ... <extra_id_99> = 32000

  // Error naming the file when it is missing or not a SentencePiece model.
  static T5Tokenizer load(const std::filesystem::path& spiece_model);

  // ids of text + </s>; max_length > 0 truncates to max_length ids keeping the final </s>.
  std::vector<int32_t> encode(std::string_view text, int max_length = 0) const;
  // Inverse of encode for display: special tokens are written back literally except the final </s>
  // and padding, which are dropped.
  std::string decode(const std::vector<int32_t>& ids) const;
  // Lower-case hex sha256 of the spiece.model bytes, recorded in trace manifests.
  std::string sha256() const;
  // 32000 SentencePiece pieces + 100 sentinels.
  int vocab_size() const;

  T5Tokenizer(T5Tokenizer&&) noexcept;
  T5Tokenizer& operator=(T5Tokenizer&&) noexcept;
  ~T5Tokenizer();

 private:
  struct Impl;
  explicit T5Tokenizer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace moetrace
