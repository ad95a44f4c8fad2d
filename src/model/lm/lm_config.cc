#include "model/lm/lm_config.h"

#include <algorithm>
#include <fstream>
#include <sstream>

#include "core/error.h"

namespace moetrace {

using json = nlohmann::json;

std::string_view lm_family_name(LmFamily f) {
  switch (f) {
    case LmFamily::kOlmoe:
      return "olmoe";
    case LmFamily::kMixtral:
      return "mixtral";
    case LmFamily::kQwen2Moe:
      return "qwen2_moe";
    case LmFamily::kQwen3Moe:
      return "qwen3_moe";
  }
  return "?";
}

bool parse_lm_family(std::string_view model_type, LmFamily* out) {
  for (LmFamily f :
       {LmFamily::kOlmoe, LmFamily::kMixtral, LmFamily::kQwen2Moe, LmFamily::kQwen3Moe}) {
    if (model_type == lm_family_name(f)) {
      *out = f;
      return true;
    }
  }
  return false;
}

namespace {

// Typed reads of one JSON object; every error names the file and the field. A null value counts
// as absent (transformers writes "clip_qkv": null, "sliding_window": null).
struct Fields {
  const json& j;
  const std::string& what;

  bool has(const char* key) const { return j.contains(key) && !j[key].is_null(); }

  int64_t integer(const char* key) const {
    const json& v = j[key];
    if (!v.is_number_integer())
      fail(what, ": field '", key, "' must be an integer, got ", v.dump());
    return v.get<int64_t>();
  }
  int64_t integer(const char* key, int64_t dflt) const { return has(key) ? integer(key) : dflt; }
  int64_t required(const char* key) const {
    if (!has(key)) fail(what, ": field '", key, "' is missing (required for this model_type)");
    return integer(key);
  }
  double number(const char* key, double dflt) const {
    if (!has(key)) return dflt;
    const json& v = j[key];
    if (!v.is_number()) fail(what, ": field '", key, "' must be a number, got ", v.dump());
    return v.get<double>();
  }
  bool boolean(const char* key, bool dflt) const {
    if (!has(key)) return dflt;
    const json& v = j[key];
    if (!v.is_boolean()) fail(what, ": field '", key, "' must be true or false, got ", v.dump());
    return v.get<bool>();
  }
  std::string string(const char* key, const std::string& dflt) const {
    if (!has(key)) return dflt;
    const json& v = j[key];
    if (!v.is_string()) fail(what, ": field '", key, "' must be a string, got ", v.dump());
    return v.get<std::string>();
  }
  // An integer or a list of integers (eos_token_id); empty when absent.
  std::vector<int64_t> integers(const char* key) const {
    if (!has(key)) return {};
    const json& v = j[key];
    if (v.is_number_integer()) return {v.get<int64_t>()};
    if (!v.is_array()) fail(what, ": field '", key, "' must be an integer or a list of integers");
    std::vector<int64_t> out;
    for (const json& e : v) {
      if (!e.is_number_integer())
        fail(what, ": field '", key, "' must be an integer or a list of integers, got ", v.dump());
      out.push_back(e.get<int64_t>());
    }
    return out;
  }
  // The first of several spellings present; both present with different values is an error.
  int64_t either(const char* a, const char* b, bool need, int64_t dflt) const {
    if (has(a) && has(b) && integer(a) != integer(b)) {
      fail(what, ": fields '", a, "' = ", integer(a), " and '", b, "' = ", integer(b),
           " disagree (they name the same thing)");
    }
    if (has(a)) return integer(a);
    if (has(b)) return integer(b);
    if (need) fail(what, ": field '", a, "' (or '", b, "') is missing");
    return dflt;
  }
};

// rope_theta / rope_scaling (the Hub) or rope_parameters (transformers 5.x) -> theta, type, factor.
void parse_rope(const Fields& f, LmConfig& c) {
  c.rope_theta = f.number("rope_theta", c.family == LmFamily::kMixtral ? 1e6 : 10000.0);
  const char* key = f.has("rope_parameters") ? "rope_parameters"
                    : f.has("rope_scaling")  ? "rope_scaling"
                                             : nullptr;
  if (key == nullptr) return;
  const json& r = f.j[key];
  if (!r.is_object()) fail(f.what, ": field '", key, "' must be an object, got ", r.dump());
  const std::string sub = std::string(key) + ".";
  if (r.contains("rope_theta") && !r["rope_theta"].is_null()) {
    if (!r["rope_theta"].is_number())
      fail(f.what, ": field '", sub, "rope_theta' must be a number, got ", r["rope_theta"].dump());
    c.rope_theta = r["rope_theta"].get<double>();
  }
  std::string type = "default";
  for (const char* k : {"rope_type", "type"}) {
    if (r.contains(k) && !r[k].is_null()) {
      if (!r[k].is_string()) fail(f.what, ": field '", sub, k, "' must be a string");
      type = r[k].get<std::string>();
      break;
    }
  }
  if (type == "default") {
    c.rope_type = RopeType::kDefault;
  } else if (type == "linear") {
    c.rope_type = RopeType::kLinear;
    if (!r.contains("factor") || !r["factor"].is_number())
      fail(f.what, ": field '", sub, "factor' must be a number for rope type linear");
    c.rope_factor = r["factor"].get<double>();
    if (!(c.rope_factor > 0)) fail(f.what, ": field '", sub, "factor' must be > 0");
  } else {
    fail(f.what, ": field '", sub, "rope_type' = '", type,
         "' is not supported (supported: default, linear; see docs/MOE_LM_SPEC.md)");
  }
  if (r.contains("partial_rotary_factor") && !r["partial_rotary_factor"].is_null() &&
      (!r["partial_rotary_factor"].is_number() ||
       r["partial_rotary_factor"].get<double>() != 1.0)) {
    fail(f.what, ": field '", sub, "partial_rotary_factor' other than 1.0 is not supported");
  }
}

void validate(const LmConfig& c, const std::string& what) {
  auto in_range = [&](const char* name, int64_t v, int64_t lo, int64_t hi) {
    if (v < lo || v > hi)
      fail(what, ": field '", name, "' = ", v, " is impossible (expected ", lo, "..", hi, ")");
  };
  in_range("vocab_size", c.vocab_size, 1, int64_t{1} << 24);
  in_range("hidden_size", c.hidden_size, 1, int64_t{1} << 16);
  in_range("intermediate_size", c.intermediate_size, 1, int64_t{1} << 20);
  in_range("moe_intermediate_size", c.moe_intermediate_size, 1, int64_t{1} << 20);
  in_range("shared_expert_intermediate_size", c.shared_expert_intermediate_size, 0,
           int64_t{1} << 20);
  in_range("num_hidden_layers", c.num_hidden_layers, 1, 1024);
  in_range("num_attention_heads", c.num_attention_heads, 1, 1024);
  in_range("num_key_value_heads", c.num_key_value_heads, 1, c.num_attention_heads);
  in_range("head_dim", c.head_dim, 2, 4096);
  in_range("num_experts", c.num_experts, 1, 65536);
  in_range("num_experts_per_tok", c.top_k, 1, c.num_experts);
  in_range("decoder_sparse_step", c.decoder_sparse_step, 1, 1024);
  if (c.num_attention_heads % c.num_key_value_heads != 0) {
    fail(what, ": num_attention_heads = ", c.num_attention_heads,
         " is not a multiple of num_key_value_heads = ", c.num_key_value_heads);
  }
  if (c.head_dim % 2 != 0) fail(what, ": field 'head_dim' = ", c.head_dim, " must be even (RoPE)");
  if (c.family == LmFamily::kOlmoe && c.head_dim * c.num_attention_heads != c.hidden_size) {
    fail(what, ": field 'head_dim' = ", c.head_dim, ": olmoe's q_norm spans hidden_size, so ",
         "head_dim * num_attention_heads must equal hidden_size = ", c.hidden_size);
  }
  if (!(c.rms_norm_eps > 0)) fail(what, ": field 'rms_norm_eps' must be > 0");
  if (!(c.rope_theta > 0)) fail(what, ": field 'rope_theta' must be > 0");
  if (c.clip_qkv < 0) fail(what, ": field 'clip_qkv' must be >= 0 or null");
  if (c.sliding_window < 0) fail(what, ": field 'sliding_window' must be > 0 or null");
  for (int64_t l : c.mlp_only_layers) in_range("mlp_only_layers[]", l, 0, c.num_hidden_layers - 1);
  auto token = [&](const char* name, int64_t id) {
    if (id < -1 || id >= c.vocab_size)
      fail(what, ": field '", name, "' = ", id, " lies outside [0, vocab_size = ", c.vocab_size,
           ")");
  };
  token("bos_token_id", c.bos_token_id);
  token("pad_token_id", c.pad_token_id);
  for (int64_t e : c.eos_token_ids) {
    if (e < 0) fail(what, ": field 'eos_token_id' = ", e, " is negative");
    token("eos_token_id", e);
  }
  if (c.dtype != "float32" && c.dtype != "bfloat16" && c.dtype != "float16") {
    fail(what, ": field 'dtype' (torch_dtype) = '", c.dtype,
         "' is not supported (expected float32, bfloat16 or float16)");
  }
}

}  // namespace

bool LmConfig::layer_sparse(int64_t i) const {
  if (family == LmFamily::kOlmoe || family == LmFamily::kMixtral) return true;
  if (std::find(mlp_only_layers.begin(), mlp_only_layers.end(), i) != mlp_only_layers.end())
    return false;
  return num_experts > 0 && (i + 1) % decoder_sparse_step == 0;
}

std::vector<int> LmConfig::sparse_layers() const {
  std::vector<int> out;
  for (int i = 0; i < num_hidden_layers; ++i) {
    if (layer_sparse(i)) out.push_back(i);
  }
  return out;
}

std::string LmConfig::summary() const {
  std::ostringstream os;
  os << lm_family_name(family) << ": " << num_hidden_layers << " layers (" << sparse_layers().size()
     << " MoE), d=" << hidden_size << ", " << num_attention_heads << " heads / "
     << num_key_value_heads << " kv of " << head_dim << ", " << num_experts << " experts top-"
     << top_k << " of F=" << moe_intermediate_size << ", vocab " << vocab_size;
  if (shared_expert_intermediate_size > 0)
    os << ", shared expert F=" << shared_expert_intermediate_size;
  return os.str();
}

LmConfig parse_lm_config(const json& j, const std::string& what) {
  if (!j.is_object()) fail(what, ": expected a JSON object");
  const Fields f{j, what};
  LmConfig c;
  const std::string model_type = f.string("model_type", "");
  if (model_type.empty()) fail(what, ": field 'model_type' is missing");
  if (!parse_lm_family(model_type, &c.family)) {
    fail(what, ": field 'model_type' = '", model_type,
         "' is not a supported language model (expected olmoe, mixtral, qwen2_moe or qwen3_moe)");
  }
  const bool qwen = c.family == LmFamily::kQwen2Moe || c.family == LmFamily::kQwen3Moe;
  c.vocab_size = f.required("vocab_size");
  c.hidden_size = f.required("hidden_size");
  c.intermediate_size = f.required("intermediate_size");
  c.moe_intermediate_size = qwen ? f.required("moe_intermediate_size") : c.intermediate_size;
  if (c.family == LmFamily::kQwen2Moe)
    c.shared_expert_intermediate_size = f.required("shared_expert_intermediate_size");
  c.num_hidden_layers = f.required("num_hidden_layers");
  c.num_attention_heads = f.required("num_attention_heads");
  // transformers' defaults when absent: olmoe = heads, mixtral 8, qwen2_moe 16, qwen3_moe 4.
  const int64_t kv_default = c.family == LmFamily::kOlmoe      ? c.num_attention_heads
                             : c.family == LmFamily::kMixtral  ? 8
                             : c.family == LmFamily::kQwen2Moe ? 16
                                                               : 4;
  c.num_key_value_heads = f.integer("num_key_value_heads", kv_default);
  if (c.num_attention_heads <= 0)
    fail(what, ": field 'num_attention_heads' = ", c.num_attention_heads, " is impossible");
  c.head_dim = f.integer("head_dim", c.hidden_size / c.num_attention_heads);
  c.max_position_embeddings = f.integer("max_position_embeddings", 0);
  c.rms_norm_eps = f.number("rms_norm_eps", qwen ? 1e-6 : 1e-5);
  parse_rope(f, c);
  c.num_experts = f.either("num_experts", "num_local_experts", true, 0);
  c.top_k = f.required("num_experts_per_tok");
  c.norm_topk_prob = c.family == LmFamily::kMixtral || f.boolean("norm_topk_prob", false);
  if (qwen) {
    c.decoder_sparse_step = f.integer("decoder_sparse_step", 1);
    if (f.has("mlp_only_layers")) {
      const json& v = j["mlp_only_layers"];
      if (!v.is_array()) fail(what, ": field 'mlp_only_layers' must be a list of layer indices");
      for (const json& e : v) {
        if (!e.is_number_integer())
          fail(what, ": field 'mlp_only_layers' must be a list of layer indices, got ", v.dump());
        c.mlp_only_layers.push_back(e.get<int64_t>());
      }
    }
    if (f.boolean("use_sliding_window", false))
      fail(what, ": field 'use_sliding_window' = true is not supported (qwen sliding attention)");
  }
  switch (c.family) {
    case LmFamily::kOlmoe:
      c.qkv_bias = c.o_bias = f.boolean("attention_bias", false);
      c.qk_norm = QkNorm::kFull;
      c.clip_qkv = f.number("clip_qkv", 0.0);
      break;
    case LmFamily::kMixtral:
      c.sliding_window = f.integer("sliding_window", 0);
      break;
    case LmFamily::kQwen2Moe:
      c.qkv_bias = f.boolean("qkv_bias", true);  // the Hub's configs have no field: always biased
      break;
    case LmFamily::kQwen3Moe:
      c.qkv_bias = c.o_bias = f.boolean("attention_bias", false);
      c.qk_norm = QkNorm::kPerHead;
      break;
  }
  const std::string act = f.string("hidden_act", "silu");
  if (act != "silu")
    fail(what, ": field 'hidden_act' = '", act, "' is not supported (expected silu)");
  c.tie_word_embeddings = f.boolean("tie_word_embeddings", false);
  c.bos_token_id = f.integer("bos_token_id", -1);
  c.pad_token_id = f.integer("pad_token_id", -1);
  c.eos_token_ids = f.integers("eos_token_id");
  c.dtype = f.has("dtype") ? f.string("dtype", "float32") : f.string("torch_dtype", "float32");
  validate(c, what);
  return c;
}

namespace {

json read_json(const std::filesystem::path& file) {
  std::ifstream in(file);
  if (!in) fail(file.string(), ": cannot open config");
  try {
    return json::parse(in);
  } catch (const json::exception& e) {
    fail(file.string(), ": not valid JSON (", e.what(), ")");
  }
}

}  // namespace

std::string read_model_type(const std::filesystem::path& config_json) {
  const json j = read_json(config_json);
  if (!j.is_object() || !j.contains("model_type") || !j["model_type"].is_string()) return "";
  return j["model_type"].get<std::string>();
}

LmConfig load_lm_config(const std::filesystem::path& config_json) {
  return parse_lm_config(read_json(config_json), config_json.string());
}

}  // namespace moetrace
