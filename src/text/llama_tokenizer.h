// The Llama / Mixtral SentencePiece tokenizer (BPE `tokenizer.model`, byte fallback) giving the
// ids transformers' LlamaTokenizer (the `tokenizers` backend, transformers 5.x) gives:
// `<unk>`, `<s>`, `</s>` (the model's control pieces) written in the text are matched first; every
// other piece of text has its spaces written as "▁" and, by the prepend scheme, a "▁" put in front
// when it does not start with one ("always": every piece, tokenizer_config.json's `legacy: true`,
// as Mixtral's; "first": only the piece at the start of the text, transformers 5's default;
// "never": `add_prefix_space: false`); the pieces go through libsentencepiece with its own dummy
// prefix turned off; `<s>` is prepended (`add_bos_token`, default true) and `</s>` appended only
// with `add_eos_token: true`. Rules: docs/TOKENIZERS.md.
#pragma once

#include <filesystem>
#include <memory>

#include "text/text_tokenizer.h"

namespace moetrace {

class LlamaSpTokenizer final : public TextTokenizer {
 public:
  // tokenizer_config: the tokenizer_config.json beside it, or empty for none (the defaults).
  static std::unique_ptr<LlamaSpTokenizer> load(const std::filesystem::path& tokenizer_model,
                                                const std::filesystem::path& tokenizer_config = {});

  std::string_view kind() const override { return "llama-spm"; }
  std::vector<int32_t> encode(std::string_view text, int max_length = 0) const override;
  // decode(ids, skip_special_tokens=True) of transformers: control pieces and `<unk>` dropped.
  std::string decode(const std::vector<int32_t>& ids) const override;
  std::string sha256() const override;
  std::vector<TokenizerFile> files() const override;
  int vocab_size() const override;
  int32_t bos_id() const override;
  int32_t eos_id() const override;
  int32_t pad_id() const override;

  ~LlamaSpTokenizer() override;
  struct Impl;

 private:
  explicit LlamaSpTokenizer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace moetrace
