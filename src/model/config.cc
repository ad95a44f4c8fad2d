#include "model/config.h"

#include <fstream>

#include "core/error.h"

namespace moetrace {

using json = nlohmann::json;

namespace {

struct FromJson {
  const json& j;
  const std::string& what;
  template <class T>
  void operator()(const char* key, T& field) {
    if (!j.contains(key) || j[key].is_null()) return;
    const json& v = j[key];
    if constexpr (std::is_same_v<T, bool>) {
      if (!v.is_boolean()) fail(what, ": field '", key, "' must be true or false, got ", v.dump());
      field = v.get<bool>();
    } else if constexpr (std::is_same_v<T, int64_t>) {
      if (!v.is_number_integer())
        fail(what, ": field '", key, "' must be an integer, got ", v.dump());
      field = v.get<int64_t>();
    } else if constexpr (std::is_same_v<T, double>) {
      if (!v.is_number()) fail(what, ": field '", key, "' must be a number, got ", v.dump());
      field = v.get<double>();
    } else {
      if (!v.is_string()) fail(what, ": field '", key, "' must be a string, got ", v.dump());
      field = v.get<std::string>();
    }
  }
};

struct ToJson {
  json& j;
  template <class T>
  void operator()(const char* key, const T& field) {
    j[key] = field;
  }
};

bool block_sparse(int64_t step, int64_t i) { return step > 0 && (i % step == 1 || step == 1); }

}  // namespace

void SwitchConfig::derive_and_validate(const std::string& what) {
  if (num_decoder_layers < 0) num_decoder_layers = num_layers;
  auto positive = [&](const char* name, int64_t v) {
    if (v <= 0) fail(what, ": ", name, " = ", v, " is impossible (expected > 0)");
  };
  positive("vocab_size", vocab_size);
  positive("d_model", d_model);
  positive("d_kv", d_kv);
  positive("d_ff", d_ff);
  positive("num_heads", num_heads);
  positive("num_layers", num_layers);
  positive("num_experts", num_experts);
  positive("expert_capacity", expert_capacity);
  positive("relative_attention_num_buckets", relative_attention_num_buckets);
  positive("relative_attention_max_distance", relative_attention_max_distance);
  if (num_decoder_layers < 0)
    fail(what, ": num_decoder_layers = ", num_decoder_layers, " is impossible");
  if (num_sparse_encoder_layers < 0 || num_sparse_encoder_layers > num_layers) {
    fail(what, ": num_sparse_encoder_layers = ", num_sparse_encoder_layers,
         " must be in [0, num_layers = ", num_layers, "]");
  }
  if (num_sparse_decoder_layers < 0 || num_sparse_decoder_layers > num_decoder_layers) {
    fail(what, ": num_sparse_decoder_layers = ", num_sparse_decoder_layers,
         " must be in [0, num_decoder_layers = ", num_decoder_layers, "]");
  }
  // Every size alone, then the products the engine allocates, in 64 bits with overflow checks (a
  // config.json may hold any int64).
  auto at_most = [&](const char* name, int64_t v, int64_t max) {
    if (v > max) fail(what, ": ", name, " = ", v, " is implausibly large (at most ", max, ")");
  };
  at_most("d_model", d_model, int64_t{1} << 16);
  at_most("d_kv", d_kv, int64_t{1} << 16);
  at_most("d_ff", d_ff, int64_t{1} << 20);
  at_most("num_heads", num_heads, int64_t{1} << 16);
  at_most("num_experts", num_experts, 65536);
  at_most("expert_capacity", expert_capacity, int64_t{1} << 24);
  at_most("vocab_size", vocab_size, int64_t{1} << 24);
  at_most("num_layers", num_layers, 1024);
  at_most("num_decoder_layers", num_decoder_layers, 1024);
  at_most("relative_attention_num_buckets", relative_attention_num_buckets, int64_t{1} << 16);
  at_most("relative_attention_max_distance", relative_attention_max_distance, int64_t{1} << 30);
  int64_t inner = 0;  // attention width
  if (__builtin_mul_overflow(num_heads, d_kv, &inner) || inner > (int64_t{1} << 16)) {
    fail(what, ": num_heads * d_kv = ", num_heads, " * ", d_kv,
         " is implausibly large (at most 65536)");
  }
  int64_t expert_weights = 0;  // elements of one layer's experts: [E, d_ff, d_model] twice
  if (__builtin_mul_overflow(num_experts, d_ff, &expert_weights) ||
      __builtin_mul_overflow(expert_weights, d_model, &expert_weights) ||
      expert_weights > (int64_t{1} << 40)) {
    fail(what, ": num_experts * d_ff * d_model = ", num_experts, " * ", d_ff, " * ", d_model,
         " is implausibly large (at most 2^40 weights per layer)");
  }
  if (relative_attention_num_buckets % 2 != 0 || relative_attention_num_buckets < 4) {
    fail(what, ": relative_attention_num_buckets = ", relative_attention_num_buckets,
         " must be even and >= 4");
  }
  if (layer_norm_epsilon <= 0) fail(what, ": layer_norm_epsilon must be > 0");
  if (router_dtype != "float32")
    fail(what, ": router_dtype '", router_dtype, "' unsupported (expected float32)");
  if (dense_act_fn != "relu")
    fail(what, ": dense_act_fn '", dense_act_fn, "' unsupported (expected relu)");
  if (feed_forward_proj != "relu") {
    fail(what, ": feed_forward_proj '", feed_forward_proj, "' unsupported (expected relu)");
  }
  if (encoder_sparse_step < 0) {
    encoder_sparse_step =
        num_sparse_encoder_layers > 0 ? num_layers / num_sparse_encoder_layers : num_layers;
  }
  if (decoder_sparse_step < 0) {
    decoder_sparse_step = num_sparse_decoder_layers > 0
                              ? num_decoder_layers / num_sparse_decoder_layers
                              : num_decoder_layers;
  }
  if (pad_token_id < 0 || pad_token_id >= vocab_size || eos_token_id < 0 ||
      eos_token_id >= vocab_size || decoder_start_token_id < 0 ||
      decoder_start_token_id >= vocab_size) {
    fail(what, ": pad/eos/decoder_start token ids must lie in [0, vocab_size = ", vocab_size, ")");
  }
}

bool SwitchConfig::encoder_block_sparse(int64_t i) const {
  return block_sparse(encoder_sparse_step, i);
}
bool SwitchConfig::decoder_block_sparse(int64_t i) const {
  return block_sparse(decoder_sparse_step, i);
}

std::vector<int> SwitchConfig::sparse_encoder_blocks() const {
  std::vector<int> out;
  for (int i = 0; i < num_layers; ++i) {
    if (encoder_block_sparse(i)) out.push_back(i);
  }
  return out;
}

std::vector<int> SwitchConfig::sparse_decoder_blocks() const {
  std::vector<int> out;
  for (int i = 0; i < num_decoder_layers; ++i) {
    if (decoder_block_sparse(i)) out.push_back(i);
  }
  return out;
}

json SwitchConfig::to_json() const {
  json j = json::object();
  const_cast<SwitchConfig*>(this)->visit(ToJson{j});
  return j;
}

SwitchConfig parse_config(const json& j, const std::string& what) {
  if (!j.is_object()) fail(what, ": expected a JSON object");
  SwitchConfig c;
  c.visit(FromJson{j, what});
  c.derive_and_validate(what);
  return c;
}

SwitchConfig load_config(const std::filesystem::path& config_json) {
  std::ifstream in(config_json);
  if (!in) fail(config_json.string(), ": cannot open config");
  json j;
  try {
    j = json::parse(in);
  } catch (const json::exception& e) {
    fail(config_json.string(), ": not valid JSON (", e.what(), ")");
  }
  return parse_config(j, config_json.string());
}

}  // namespace moetrace
