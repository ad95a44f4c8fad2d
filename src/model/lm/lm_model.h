// A decoder-only MoE language model (olmoe, mixtral, qwen2_moe, qwen3_moe) on the CPU, in float32,
// exactly as transformers' modeling files compute it (docs/MOE_LM_SPEC.md): the reference of the
// GPU engine and of the trace store's LM routing.
//
// Observation keys (the MoE blocks only; i is the transformer block index):
//   lm.{i}.hidden [B,S,d] F32, lm.{i}.router_logits [B,S,E] F32, lm.{i}.expert [B,S,k] I32,
//   lm.{i}.gate [B,S,k] F32, lm.output [B,S,d] F32 for the prompt (prefill) pass;
//   gen.{i}.* with shapes [B,1,...] once per generation step.
#pragma once

#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "core/tensor.h"
#include "io/checkpoint.h"
#include "model/lm/lm_config.h"
#include "model/lm/lm_weights.h"
#include "model/observer.h"
#include "model/switch_model.h"  // Batch

namespace moetrace {

// The observation key "lm.3.router_logits" (gen = false) or "gen.3.router_logits" (gen = true).
std::string lm_key(bool gen, int64_t block, std::string_view field);

// The router after its logits, the one statement of the rule (docs/MOE_LM_SPEC.md, 5.): per
// token row t of logits [n, E], probs = softmax(logits[t]) in float32 over all E experts; ids[t]
// [k] = the k largest in descending order, exact ties to the lowest index; weights[t] [k] = their
// probabilities, divided by their float32 sum when renormalize (norm_topk_prob; mixtral always).
void lm_topk_route(const float* logits, int64_t n, int64_t E, int64_t k, bool renormalize,
                   int32_t* ids, float* weights);

// RoPE's inverse frequencies [hd/2], float32 as transformers computes them: 1 / theta^(2i/hd),
// divided by the factor for linear scaling. Angle of position p: p * inv_freq[i] (float32).
std::vector<float> rope_inv_freq(const LmConfig& c);

struct LmGenerateResult {
  int64_t B = 0, S = 0, new_tokens = 0;
  std::vector<int32_t> ids;  // [B, S + new_tokens]: the prompt, then the greedy tokens
  // [B, S + new_tokens - 1]: the RoPE position of every column run (the prefill's, then one per
  // cached step), as transformers' generate_position_ids.
  std::vector<int32_t> positions;
};

class LmModel {
 public:
  // Reads dir/config.json (and dir/generation_config.json's eos_token_id when present) and the
  // checkpoint in dir.
  static std::unique_ptr<LmModel> load(const std::filesystem::path& dir,
                                       const WeightOptions& options = {});
  static std::unique_ptr<LmModel> from_source(LmConfig config, std::shared_ptr<TensorSource> source,
                                              const WeightOptions& options = {});

  const LmConfig& config() const { return config_; }
  const LmWeights& weights() const { return weights_; }
  const TensorSource& source() const { return *source_; }
  // The token ids greedy generation never picks (generation_config.json's eos_token_id, else
  // config.json's): transformers' min_new_tokens = N bans them for all N steps.
  const std::vector<int64_t>& banned_ids() const { return banned_; }
  void set_banned_ids(std::vector<int64_t> ids) { banned_ = std::move(ids); }

  // model.forward over a right-padded batch: positions 0..S-1, padding keys masked. Returns the
  // logits [B,S,V]; offers lm.* keys.
  Tensor forward(const Batch& batch, Observer* obs) const;

  // generate(max_new_tokens = N, min_new_tokens = N, do_sample = False): a prefill pass with
  // generate's positions (cumsum(mask) - 1, pads 0), offering lm.* keys, then N - 1 cached steps
  // (each routes the token chosen before it), offering gen.* keys. The next token of row b is the
  // first maximum of the last column's logits with banned_ids() excluded (for a right-padded row
  // the last column is a pad token, as in transformers).
  LmGenerateResult generate(const Batch& batch, int64_t new_tokens, Observer* obs) const;

 private:
  LmModel() = default;
  LmConfig config_;
  std::shared_ptr<TensorSource> source_;
  LmWeights weights_;
  std::vector<int64_t> banned_;
};

}  // namespace moetrace
