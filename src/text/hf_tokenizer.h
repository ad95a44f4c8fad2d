// A Hugging Face `tokenizers` BPE tokenizer read from tokenizer.json, giving the ids
// `tokenizers.Tokenizer.from_file(path).encode(text).ids` gives: added tokens matched first (on
// the raw text, or on the normalized text for normalized=true ones; lstrip/rstrip honoured), the
// normalizer (NFC/NFD/NFKC/NFKD, or a Sequence of them), the pre-tokenizers (Split with a regex
// and behavior Isolated, ByteLevel with add_prefix_space/use_regex, or a Sequence of them), the
// BPE model (merge ranks, byte_fallback, unk_token/fuse_unk, ignore_merges) and the
// post-processor (ByteLevel, TemplateProcessing, or a Sequence of them). This is what OLMoE's and
// Qwen2/Qwen3-MoE's tokenizer.json use; anything else is refused at load with an error that names
// the file and the field. Rules: docs/TOKENIZERS.md.
#pragma once

#include <filesystem>
#include <memory>
#include <optional>
#include <string>

#include "text/text_tokenizer.h"

namespace moetrace {

class HfBpeTokenizer final : public TextTokenizer {
 public:
  // tokenizer_config: the tokenizer_config.json beside it (bos_token / eos_token / pad_token), or
  // empty for none.
  static std::unique_ptr<HfBpeTokenizer> load(const std::filesystem::path& tokenizer_json,
                                              const std::filesystem::path& tokenizer_config = {});
  // The same from the file's text (`name` is what errors call it).
  static std::unique_ptr<HfBpeTokenizer> parse(const std::string& json_text,
                                               const std::string& name);

  std::string_view kind() const override { return "hf-bpe"; }
  std::vector<int32_t> encode(std::string_view text, int max_length = 0) const override;
  // decode(ids, skip_special_tokens=False) of `tokenizers`: every id written, added tokens as
  // their content.
  std::string decode(const std::vector<int32_t>& ids) const override;
  std::string sha256() const override;
  std::vector<TokenizerFile> files() const override;
  int vocab_size() const override;
  int32_t bos_id() const override;
  int32_t eos_id() const override;
  int32_t pad_id() const override;

  // The id of a token (vocabulary or added token), nullopt when there is none.
  std::optional<int32_t> token_to_id(std::string_view token) const;

  ~HfBpeTokenizer() override;
  struct Impl;

 private:
  explicit HfBpeTokenizer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace moetrace
