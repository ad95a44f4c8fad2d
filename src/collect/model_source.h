// Which model a collection runs: a directory or Hub id (resolved offline), the largest
// google/switch-base-* in the Hugging Face cache when none is named, or the built-in demo model
// (seeded random weights in the switch-base layout) when the cache has none.
#pragma once

#include <filesystem>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>

#include "model/switch_model.h"

namespace moetrace {

struct ModelChoice {
  std::string id;                // Hub id, directory, or "moetrace-demo"
  std::filesystem::path dir;     // empty for the demo
  std::filesystem::path spiece;  // the tokenizer model
  bool demo = false;
  SwitchConfig config;
  std::shared_ptr<TensorSource> weights;
};

// spec: "" (default: largest cached switch-base, else the demo), "demo", "random:switch-base-N",
// "random:switch-large-N" (that published shape, seeded random weights), a directory or a Hub id.
ModelChoice choose_model(const std::string& spec, bool encoder_only);

// The manifest's "model" object: id, files with sizes and sha256, config, tokenizer sha256, demo.
nlohmann::json describe_model(const ModelChoice& m, const std::string& tokenizer_sha256);

}  // namespace moetrace
