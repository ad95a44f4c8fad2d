// The config.json of a decoder-only MoE language model (olmoe, mixtral, qwen2_moe, qwen3_moe) as a
// plain struct, read in both spellings: the Hub's (rope_theta, rope_scaling, torch_dtype,
// num_local_experts) and transformers 5.x's (rope_parameters {rope_theta, rope_type, factor}, dtype,
// num_experts). docs/MOE_LM_SPEC.md lists every field, its default and the values refused.
#pragma once

#include <cstdint>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>
#include <vector>

namespace moetrace {

enum class LmFamily : uint8_t { kOlmoe, kMixtral, kQwen2Moe, kQwen3Moe };

// config.json's model_type spelling: "olmoe", "mixtral", "qwen2_moe", "qwen3_moe".
std::string_view lm_family_name(LmFamily f);
// False for any other model_type (e.g. switch_transformers).
bool parse_lm_family(std::string_view model_type, LmFamily* out);

// Where the q/k RMS norms sit.
enum class QkNorm : uint8_t {
  kNone,     // mixtral, qwen2_moe
  kFull,     // olmoe: q_norm over the whole q projection [H*hd], k_norm over [KV*hd], before RoPE
  kPerHead,  // qwen3_moe: one [hd] weight applied to every head of q and of k, before RoPE
};

enum class RopeType : uint8_t {
  kDefault,  // inv_freq[i] = 1 / theta^(2i/hd)
  kLinear,   // inv_freq[i] / factor
};

struct LmConfig {
  LmFamily family = LmFamily::kMixtral;
  int64_t vocab_size = 0;
  int64_t hidden_size = 0;            // d
  int64_t intermediate_size = 0;      // dense MLP width (and the experts' for olmoe/mixtral)
  int64_t moe_intermediate_size = 0;  // F of one expert (qwen: moe_intermediate_size)
  int64_t shared_expert_intermediate_size = 0;  // qwen2_moe's shared expert; 0 = none
  int64_t num_hidden_layers = 0;
  int64_t num_attention_heads = 0;  // H
  int64_t num_key_value_heads = 0;  // KV (H % KV == 0)
  int64_t head_dim = 0;             // hd; config head_dim or hidden_size / H
  int64_t max_position_embeddings = 0;
  double rms_norm_eps = 1e-6;
  double rope_theta = 10000.0;
  RopeType rope_type = RopeType::kDefault;
  double rope_factor = 1.0;     // linear only
  int64_t num_experts = 0;      // E
  int64_t top_k = 0;            // num_experts_per_tok
  bool norm_topk_prob = false;  // renormalize the k weights to sum 1 (mixtral: always)
  int64_t decoder_sparse_step = 1;
  std::vector<int64_t> mlp_only_layers;  // layers with a dense MLP whatever the step
  bool qkv_bias = false;                 // q/k/v projections have a bias
  bool o_bias = false;                   // o projection has a bias
  QkNorm qk_norm = QkNorm::kNone;
  double clip_qkv = 0.0;       // olmoe: q, k, v clamped to [-clip, clip] when > 0
  int64_t sliding_window = 0;  // mixtral: key j visible from query i iff i - j < W; 0 = none
  bool tie_word_embeddings = false;
  int64_t bos_token_id = -1;           // -1: none
  std::vector<int64_t> eos_token_ids;  // config.json's eos_token_id (int or list); may be empty
  int64_t pad_token_id = -1;           // -1: none
  std::string dtype = "float32";       // the checkpoint's dtype as config.json says it

  // Layer i has a MoE block (else a dense MLP of intermediate_size): olmoe and mixtral every layer;
  // qwen: i not in mlp_only_layers and (i + 1) % decoder_sparse_step == 0.
  bool layer_sparse(int64_t i) const;
  // The sparse layers in order: MoE layer k of the outputs is layer sparse_layers()[k].
  std::vector<int> sparse_layers() const;
  // One line for logs: "mixtral: 2 layers, d=64, 8 experts top-2, ...".
  std::string summary() const;

  bool operator==(const LmConfig&) const = default;
};

// model_type of a config.json ("" when absent); Error when the file cannot be read.
std::string read_model_type(const std::filesystem::path& config_json);

// Parses config.json; unknown keys are ignored, absent optional keys take transformers' defaults.
// Error "<what>: field '<name>' ..." for a missing required field, a wrong type, an impossible or
// unsupported value.
LmConfig parse_lm_config(const nlohmann::json& j, const std::string& what);
LmConfig load_lm_config(const std::filesystem::path& config_json);

}  // namespace moetrace
