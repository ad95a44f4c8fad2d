// SwitchTransformersConfig as a plain struct. One field list (visit) drives parsing, printing and
// comparison, so a field added here is handled everywhere.
#pragma once

#include <cstdint>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace moetrace {

struct SwitchConfig {
  int64_t vocab_size = 32128;
  int64_t d_model = 768;
  int64_t d_kv = 64;
  int64_t d_ff = 2048;
  int64_t num_layers = 12;
  int64_t num_decoder_layers = -1;  // absent -> num_layers
  int64_t num_heads = 12;
  int64_t num_experts = 8;
  int64_t num_sparse_encoder_layers = 3;
  int64_t num_sparse_decoder_layers = 3;
  int64_t encoder_sparse_step = -1;  // absent -> derived (see derive())
  int64_t decoder_sparse_step = -1;
  int64_t expert_capacity = 64;
  bool router_bias = false;
  double router_jitter_noise = 0.01;  // training only; never applied here
  std::string router_dtype = "float32";
  bool router_ignore_padding_tokens = false;  // stored but unused by the 4.x model
  int64_t relative_attention_num_buckets = 32;
  int64_t relative_attention_max_distance = 128;
  double dropout_rate = 0.1;
  double layer_norm_epsilon = 1e-6;
  double router_z_loss_coef = 0.001;
  double router_aux_loss_coef = 0.001;
  double initializer_factor = 1.0;
  std::string dense_act_fn = "relu";
  std::string feed_forward_proj = "relu";
  bool is_encoder_decoder = true;
  bool add_router_probs = false;
  bool use_cache = true;
  int64_t pad_token_id = 0;
  int64_t eos_token_id = 1;
  int64_t decoder_start_token_id = 0;
  bool tie_word_embeddings = true;

  template <class Visitor>
  void visit(Visitor&& v) {
    v("vocab_size", vocab_size);
    v("d_model", d_model);
    v("d_kv", d_kv);
    v("d_ff", d_ff);
    v("num_layers", num_layers);
    v("num_decoder_layers", num_decoder_layers);
    v("num_heads", num_heads);
    v("num_experts", num_experts);
    v("num_sparse_encoder_layers", num_sparse_encoder_layers);
    v("num_sparse_decoder_layers", num_sparse_decoder_layers);
    v("encoder_sparse_step", encoder_sparse_step);
    v("decoder_sparse_step", decoder_sparse_step);
    v("expert_capacity", expert_capacity);
    v("router_bias", router_bias);
    v("router_jitter_noise", router_jitter_noise);
    v("router_dtype", router_dtype);
    v("router_ignore_padding_tokens", router_ignore_padding_tokens);
    v("relative_attention_num_buckets", relative_attention_num_buckets);
    v("relative_attention_max_distance", relative_attention_max_distance);
    v("dropout_rate", dropout_rate);
    v("layer_norm_epsilon", layer_norm_epsilon);
    v("router_z_loss_coef", router_z_loss_coef);
    v("router_aux_loss_coef", router_aux_loss_coef);
    v("initializer_factor", initializer_factor);
    v("dense_act_fn", dense_act_fn);
    v("feed_forward_proj", feed_forward_proj);
    v("is_encoder_decoder", is_encoder_decoder);
    v("add_router_probs", add_router_probs);
    v("use_cache", use_cache);
    v("pad_token_id", pad_token_id);
    v("eos_token_id", eos_token_id);
    v("decoder_start_token_id", decoder_start_token_id);
    v("tie_word_embeddings", tie_word_embeddings);
  }

  // Fills the derived fields (num_decoder_layers, sparse steps) and checks the values; throws Error
  // naming `what` (the config file) and the field.
  void derive_and_validate(const std::string& what);

  // Block i of a stack is sparse iff step > 0 and (i % step == 1 or step == 1).
  bool encoder_block_sparse(int64_t i) const;
  bool decoder_block_sparse(int64_t i) const;
  std::vector<int> sparse_encoder_blocks() const;
  std::vector<int> sparse_decoder_blocks() const;

  nlohmann::json to_json() const;
  bool operator==(const SwitchConfig& o) const { return to_json() == o.to_json(); }
};

// Parses config.json (unknown keys ignored, absent keys defaulted), then derive_and_validate().
SwitchConfig load_config(const std::filesystem::path& config_json);
SwitchConfig parse_config(const nlohmann::json& j, const std::string& what);

}  // namespace moetrace
