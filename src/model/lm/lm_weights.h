// The checkpoint of a decoder-only MoE language model mapped onto typed per-layer structs, every
// shape checked against the config. Two expert layouts are read (docs/MOE_LM_SPEC.md, "Weights"):
//   per-expert (the Hub's, and what transformers 5.x save_pretrained writes back):
//     mixtral  model.layers.L.block_sparse_moe.experts.X.{w1 (gate), w3 (up), w2 (down)}.weight
//              model.layers.L.block_sparse_moe.gate.weight
//     others   model.layers.L.mlp.experts.X.{gate_proj, up_proj, down_proj}.weight, mlp.gate.weight
//   fused (transformers 5.x's in-memory modules):
//     model.layers.L.mlp.experts.gate_up_proj [E, 2F, d] (gate rows 0..F-1, up rows F..2F-1)
//     model.layers.L.mlp.experts.down_proj    [E, d, F]
//     model.layers.L.mlp.gate.weight          [E, d]
// Attention, norms, routers and dense MLPs are float32 copies; expert weights and the embedding
// stay in the checkpoint's dtype (memory-mapped, F32/BF16/F16) and are converted when used unless
// the whole expert set fits WeightOptions::f32_expert_budget_bytes. A fused layout's experts are
// views into the 3-D tensors (no copy).
#pragma once

#include <string>
#include <vector>

#include "io/checkpoint.h"
#include "model/lm/lm_config.h"
#include "model/weights.h"

namespace moetrace {

// A SwiGLU MLP: down(silu(gate(x)) * up(x)). gate, up [F, d]; down [d, F] (Linear layout).
struct LmMlp {
  Matrix gate, up, down;
};

struct LmAttention {
  Matrix q;                                   // [H*hd, d]
  Matrix k;                                   // [KV*hd, d]
  Matrix v;                                   // [KV*hd, d]
  Matrix o;                                   // [d, H*hd]
  std::vector<float> q_bias, k_bias, v_bias;  // [H*hd], [KV*hd], [KV*hd] or empty
  std::vector<float> o_bias;                  // [d] or empty
  // QkNorm::kFull: q_norm [H*hd], k_norm [KV*hd]; kPerHead: both [hd]; kNone: empty.
  std::vector<float> q_norm, k_norm;
};

struct LmMoe {
  Matrix router;               // [E, d] float32
  std::vector<LmMlp> experts;  // E experts of width F = moe_intermediate_size
  bool has_shared = false;     // qwen2_moe
  LmMlp shared;                // width shared_expert_intermediate_size
  Matrix shared_gate;          // [1, d] float32
};

struct LmLayer {
  std::vector<float> input_norm;      // [d] input_layernorm
  std::vector<float> post_attn_norm;  // [d] post_attention_layernorm
  LmAttention attn;
  bool sparse = false;
  LmMlp dense;  // !sparse: width intermediate_size, float32
  LmMoe moe;    // sparse
};

struct LmWeights {
  Matrix embed;  // [V, d] model.embed_tokens.weight, in its dtype
  std::vector<LmLayer> layers;
  std::vector<float> final_norm;  // [d] model.norm.weight
  Matrix lm_head;                 // [V, d]; aliases embed when tie_word_embeddings
  // "per-expert" or "fused" (the first MoE layer's; every layer is read in its own layout).
  std::string expert_layout;
};

// Maps the source's tensors and checks every shape and dtype; Error "<file>: tensor '<name>' is
// missing (expected shape [..])" or "... has shape [..] but config.json implies [..]" for the
// first problem. Router weights holding NaN/Inf are logged as one warning per tensor.
LmWeights map_lm_weights(const LmConfig& config, const TensorSource& source,
                         const WeightOptions& options);

}  // namespace moetrace
