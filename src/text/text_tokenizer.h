// One tokenizer interface for every model family moetrace runs, and the factory that picks the
// implementation from the files of a model directory. Each implementation gives the ids Hugging
// Face gives for the same files (see docs/TOKENIZERS.md for the rules and what is refused):
//   spiece.model     -> T5 SentencePiece (unigram) with transformers' T5Tokenizer rules (text/tokenizer.h)
//   tokenizer.model  -> Llama / Mixtral SentencePiece BPE as transformers' LlamaTokenizer
//                       (text/llama_tokenizer.h)
//   tokenizer.json   -> a Hugging Face `tokenizers` BPE (byte-level: OLMoE, Qwen2/Qwen3 MoE)
//                       (text/hf_tokenizer.h)
// Every method is const and safe to call from several threads at once.
#pragma once

#include <cstdint>
#include <filesystem>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace moetrace {

// One file a tokenizer was read from, for trace manifests.
struct TokenizerFile {
  std::string name;    // file name inside the model directory, e.g. "tokenizer.json"
  std::string sha256;  // lower-case hex sha256 of its bytes
};

class TextTokenizer {
 public:
  virtual ~TextTokenizer() = default;

  // "t5-spiece", "llama-spm" or "hf-bpe".
  virtual std::string_view kind() const = 0;
  // ids of text with the family's special tokens (T5: `</s>` appended; Llama: `<s>` prepended;
  // tokenizer.json: its post-processor's template, none for OLMoE and Qwen). max_length > 0: at most
  // max_length ids, cut as transformers' truncation cuts them: the text's own ids lose their tail,
  // the added special tokens stay.
  virtual std::vector<int32_t> encode(std::string_view text, int max_length = 0) const = 0;
  // Text of ids for display (see docs/TOKENIZERS.md for which special tokens each kind writes).
  virtual std::string decode(const std::vector<int32_t>& ids) const = 0;
  // sha256 of the main tokenizer file (spiece.model, tokenizer.model or tokenizer.json).
  virtual std::string sha256() const = 0;
  // Every file that decided the ids: the main file first, then tokenizer_config.json where read.
  virtual std::vector<TokenizerFile> files() const = 0;
  // Number of ids (largest id + 1), added tokens included.
  virtual int vocab_size() const = 0;
  // Special ids, -1 when the tokenizer has none.
  virtual int32_t bos_id() const = 0;
  virtual int32_t eos_id() const = 0;
  virtual int32_t pad_id() const = 0;
};

// Picks by the files present in model_dir, in this order: spiece.model (T5), tokenizer.model
// (Llama/Mixtral SentencePiece, with tokenizer_config.json when present), tokenizer.json
// (Hugging Face BPE, with tokenizer_config.json when present). Error naming the directory when
// none is there, or naming the file and field when a file cannot be used.
std::unique_ptr<TextTokenizer> load_text_tokenizer(const std::filesystem::path& model_dir);

// Loads one tokenizer file by its name (spiece.model, tokenizer.model, tokenizer.json; other
// names by their extension: .json -> Hugging Face BPE, .model -> Llama SentencePiece); the
// tokenizer_config.json beside it is read when present.
std::unique_ptr<TextTokenizer> load_text_tokenizer_file(const std::filesystem::path& file);

}  // namespace moetrace
