#include "collect/model_source.h"

#include <unistd.h>

#include <fstream>

#include "core/error.h"
#include "core/log.h"
#include "core/sha256.h"
#include "data/catalog.h"
#include "io/hf_cache.h"
#include "model/random_weights.h"

namespace moetrace {

namespace fs = std::filesystem;

ModelChoice choose_model(const std::string& spec, bool encoder_only) {
  ModelChoice m;
  std::string chosen = spec;
  if (chosen.empty()) {
    const auto cached = list_cached_models("google/switch-base-");
    if (!cached.empty()) {
      chosen = cached.back().id;  // sorted by expert count: the last is the largest
      log_info("no --model given: using ", chosen, ", the largest switch-base model in ",
               hf_hub_cache_dir().string());
    } else {
      chosen = "demo";
      log_warn("no --model given and no google/switch-base-* in the Hugging Face cache (",
               hf_hub_cache_dir().string(),
               "): using the built-in demo model. Its weights are seeded random numbers, so its "
               "routing says "
               "nothing about a trained model's; for real traces download one "
               "(moetrace fetch --model google/switch-base-128) or pass --model DIR.");
    }
  }
  // random:switch-base-N / random:switch-large-N: that published shape with seeded random weights
  // (transformers' init scales; bf16 from 64 experts up), for benchmarks and pipeline checks
  // without a download.
  const std::string kRandom = "random:";
  if (chosen.rfind(kRandom, 0) == 0) {
    const std::optional<SwitchConfig> shape = published_config(chosen.substr(kRandom.size()));
    if (!shape)
      fail("--model '", chosen,
           "': expected random:switch-base-<experts> or random:switch-large-<experts> (experts "
           "1..4096, e.g. random:switch-base-128, random:switch-large-128)");
    const int64_t experts = shape->num_experts;
    m.id = chosen;
    m.demo = true;
    m.config = *shape;
    RandomWeightOptions ro;
    ro.seed = kDemoSeed;
    ro.encoder_only = encoder_only;
    ro.dtype = experts >= 64 ? DType::kBF16 : DType::kF32;
    m.weights = make_random_weights(m.config, ro);
    m.spiece = data::demo_spiece_model();
    return m;
  }
  if (chosen == "demo") {
    m.id = "moetrace-demo";
    m.demo = true;
    m.config = demo_config();
    RandomWeightOptions ro;
    ro.seed = kDemoSeed;
    ro.encoder_only = encoder_only;
    m.weights = make_random_weights(m.config, ro);
    m.spiece = data::demo_spiece_model();
    return m;
  }
  const ResolvedModel r = resolve_model(chosen);
  m.id = r.id;
  m.dir = r.dir;
  LmFamily family;
  if (parse_lm_family(read_model_type(r.dir / "config.json"), &family)) {
    m.lm = load_lm_config(r.dir / "config.json");
    m.weights = open_checkpoint(r.dir);
    return m;
  }
  m.config = load_config(r.dir / "config.json");
  m.weights = open_checkpoint(r.dir);
  m.spiece = r.dir / "spiece.model";
  return m;
}

std::unique_ptr<TextTokenizer> load_model_tokenizer(const ModelChoice& m, const fs::path& file) {
  if (!file.empty()) return load_text_tokenizer_file(file);
  if (!m.lm) {
    if (!fs::exists(m.spiece))
      fail(m.spiece.string(), ": no spiece.model beside the checkpoint; pass --tokenizer FILE");
    return load_text_tokenizer_file(m.spiece);
  }
  try {
    return load_text_tokenizer(m.dir);
  } catch (const Error& e) {
    fail(e.what(), "; pass --tokenizer FILE");
  }
}

namespace {

// The Hugging Face cache stores LFS files as blobs named by their sha256 and links snapshot files
// to them; reuse that name instead of hashing tens of GB at every start.
std::string file_sha256(const fs::path& f) {
  std::error_code ec;
  if (fs::is_symlink(f, ec)) {
    const std::string name = fs::read_symlink(f, ec).filename().string();
    if (!ec && name.size() == 64 && name.find_first_not_of("0123456789abcdef") == std::string::npos)
      return name;
  }
  return sha256_file(f);
}

// A language model's config.json as it is (its fields are model/lm/lm_config.h's to interpret).
nlohmann::json read_json_file(const fs::path& path) {
  std::ifstream in(path);
  try {
    return nlohmann::json::parse(in);
  } catch (const nlohmann::json::exception& e) {
    fail(path.string(), ": not valid JSON (", e.what(), ")");
  }
}

}  // namespace

nlohmann::json describe_model(const ModelChoice& m, const std::string& tokenizer_sha256) {
  nlohmann::json files = nlohmann::json::array();
  if (!m.demo) {
    for (const fs::path& f : m.weights->files()) {
      files.push_back(
          {{"path", f.string()}, {"bytes", fs::file_size(f)}, {"sha256", file_sha256(f)}});
    }
    files.push_back({{"path", (m.dir / "config.json").string()},
                     {"bytes", fs::file_size(m.dir / "config.json")},
                     {"sha256", sha256_file(m.dir / "config.json")}});
  }
  nlohmann::json j = {{"id", m.id},
                      {"demo", m.demo},
                      {"format", m.weights->format()},
                      {"files", files},
                      {"config", m.lm ? read_json_file(m.dir / "config.json") : m.config.to_json()},
                      {"tokenizer_sha256", tokenizer_sha256}};
  if (m.demo) j["demo_seed"] = kDemoSeed;
  return j;
}

}  // namespace moetrace
