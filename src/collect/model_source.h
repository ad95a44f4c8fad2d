// Which model a collection runs: a directory or Hub id (resolved offline), the largest
// google/switch-base-* in the Hugging Face cache when none is named, or the built-in demo model
// (seeded random weights in the switch-base layout) when the cache has none.
#pragma once

#include <filesystem>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>

#include "model/lm/lm_config.h"
#include "model/switch_model.h"
#include "text/text_tokenizer.h"

namespace moetrace {

struct ModelChoice {
  std::string id;                // Hub id, directory, or "moetrace-demo"
  std::filesystem::path dir;     // empty for the demo
  std::filesystem::path spiece;  // the tokenizer model
  bool demo = false;
  SwitchConfig config;  // a Switch model's
  // A decoder-only MoE language model's (config.json's model_type olmoe, mixtral, qwen2_moe or
  // qwen3_moe; docs/MOE_LM_SPEC.md); `config` is then unused.
  std::optional<LmConfig> lm;
  std::shared_ptr<TensorSource> weights;
};

// spec: "" (default: largest cached switch-base, else the demo), "demo", "random:switch-base-N",
// "random:switch-large-N" (that published shape, seeded random weights), a directory or a Hub id.
ModelChoice choose_model(const std::string& spec, bool encoder_only);

// The tokenizer of a collection: `file` when given (--tokenizer), else the model's: spiece.model
// for Switch (error naming it when absent), the files of a language model's directory
// (text/text_tokenizer.h's choice).
std::unique_ptr<TextTokenizer> load_model_tokenizer(const ModelChoice& m,
                                                    const std::filesystem::path& file);

// The manifest's "model" object: id, files with sizes and sha256, config, tokenizer sha256, demo.
nlohmann::json describe_model(const ModelChoice& m, const std::string& tokenizer_sha256);

}  // namespace moetrace
