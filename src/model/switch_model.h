// The Switch Transformers encoder-decoder on the CPU, exactly per SWITCH_SPEC.md (transformers 4.x
// semantics): unscaled attention with relative position bias and padding mask, RMS norm, ReLU FFN,
// float32 router, top-1 with lowest-index ties, per-sequence expert capacity in position order.
#pragma once

#include <filesystem>
#include <memory>
#include <vector>

#include "io/checkpoint.h"
#include "model/config.h"
#include "model/observer.h"
#include "model/position.h"
#include "model/weights.h"

namespace moetrace {

// A right-padded batch. input_ids and attention_mask are [B,S] row-major.
struct Batch {
  int64_t B = 0, S = 0;
  std::vector<int32_t> input_ids;
  std::vector<int32_t> attention_mask;
};

struct LoadOptions {
  bool encoder_only = false;
  size_t f32_expert_budget_bytes = size_t{4} << 30;
};

struct GenerateResult {
  int64_t B = 0, steps = 0;
  std::vector<int32_t> ids;  // [B, steps+1]: the start token, then one generated token per step
};

class SwitchModel {
 public:
  // Reads dir/config.json and the checkpoint in dir (any supported format).
  static std::unique_ptr<SwitchModel> load(const std::filesystem::path& dir,
                                           const LoadOptions& options);
  static std::unique_ptr<SwitchModel> from_source(SwitchConfig config,
                                                  std::shared_ptr<TensorSource> source,
                                                  const LoadOptions& options);

  const SwitchConfig& config() const { return config_; }
  const SwitchWeights& weights() const { return weights_; }
  const TensorSource& source() const { return *source_; }

  // Encoder over a padded batch. Returns the final hidden states [B,S,d].
  Tensor encode(const Batch& batch, Observer* obs) const;

  // Teacher-forced decoder pass over dec_ids [B,T] given the encoder output. Returns LM logits
  // [B,T,V].
  Tensor decode(const Tensor& enc_out, const Batch& batch, const std::vector<int32_t>& dec_ids,
                int64_t T, Observer* obs) const;

  // Greedy generation from the decoder start token with a KV cache: max_new_tokens steps at most;
  // the eos logit is masked for the first min_new_tokens steps; a sequence that produced eos is
  // finished and gets pad tokens (its routing is still computed, as transformers does). Stops early
  // when every sequence has finished. Observation keys are offered once per step with shapes
  // [B,1,...].
  GenerateResult generate(const Tensor& enc_out, const Batch& batch, int64_t max_new_tokens,
                          int64_t min_new_tokens, Observer* obs) const;

 private:
  SwitchModel() = default;
  SwitchConfig config_;
  std::shared_ptr<TensorSource> source_;
  SwitchWeights weights_;
};

}  // namespace moetrace
