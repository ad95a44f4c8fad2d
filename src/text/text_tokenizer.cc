#include "text/text_tokenizer.h"

#include "core/error.h"
#include "text/hf_tokenizer.h"
#include "text/llama_tokenizer.h"
#include "text/text_util.h"
#include "text/tokenizer.h"

namespace moetrace {

namespace {

namespace fs = std::filesystem;

// T5Tokenizer behind the common interface (its own behaviour unchanged).
class T5TextTokenizer final : public TextTokenizer {
 public:
  explicit T5TextTokenizer(const fs::path& spiece)
      : tok_(T5Tokenizer::load(spiece)), name_(spiece.filename().string()) {}
  std::string_view kind() const override { return "t5-spiece"; }
  std::vector<int32_t> encode(std::string_view text, int max_length) const override {
    return tok_.encode(text, max_length);
  }
  std::string decode(const std::vector<int32_t>& ids) const override { return tok_.decode(ids); }
  std::string sha256() const override { return tok_.sha256(); }
  std::vector<TokenizerFile> files() const override { return {{name_, tok_.sha256()}}; }
  int vocab_size() const override { return tok_.vocab_size(); }
  int32_t bos_id() const override { return -1; }
  int32_t eos_id() const override { return T5Tokenizer::kEos; }
  int32_t pad_id() const override { return T5Tokenizer::kPad; }

 private:
  T5Tokenizer tok_;
  std::string name_;
};

fs::path config_beside(const fs::path& file) {
  fs::path cfg = file.parent_path() / "tokenizer_config.json";
  return fs::exists(cfg) ? cfg : fs::path();
}

// A .model file under another name: T5's vocabulary has pad=0 eos=1 unk=2, Llama's unk=0.
bool looks_like_t5(const fs::path& model) {
  try {
    T5Tokenizer::load(model);
    return true;
  } catch (const Error&) {
    return false;
  }
}

}  // namespace

std::unique_ptr<TextTokenizer> load_text_tokenizer_file(const fs::path& file) {
  const std::string name = file.filename().string();
  if (!fs::exists(file)) fail(file.string(), ": no such tokenizer file");
  if (name == "spiece.model") return std::make_unique<T5TextTokenizer>(file);
  if (name == "tokenizer.model") return LlamaSpTokenizer::load(file, config_beside(file));
  if (file.extension() == ".json") return HfBpeTokenizer::load(file, config_beside(file));
  if (file.extension() == ".model") {
    if (looks_like_t5(file)) return std::make_unique<T5TextTokenizer>(file);
    return LlamaSpTokenizer::load(file, config_beside(file));
  }
  fail(file.string(),
       ": not a tokenizer file (expected spiece.model, tokenizer.model, "
       "tokenizer.json, or a .model / .json file)");
}

std::unique_ptr<TextTokenizer> load_text_tokenizer(const fs::path& model_dir) {
  for (const char* name : {"spiece.model", "tokenizer.model", "tokenizer.json"}) {
    fs::path file = model_dir / name;
    if (fs::exists(file)) return load_text_tokenizer_file(file);
  }
  fail(model_dir.string(),
       ": no tokenizer (expected spiece.model, tokenizer.model or tokenizer.json)");
}

}  // namespace moetrace
