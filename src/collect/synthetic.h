// Model-free synthetic traces, as the seed system documents them, but seeded: each (sample, MoE
// layer) trace favours one expert; the first E synthetic traces favour experts 0..E-1 in turn, so
// expert coverage is 100% by design; later ones favour a seeded random expert.
#pragma once

#include <cstdint>
#include <vector>

namespace moetrace {

struct SyntheticSample {
  std::vector<int32_t> token_ids;            // [S], random ids ending in </s>
  std::vector<std::vector<float>> logits;    // per layer [S*E]
  std::vector<std::vector<int32_t>> expert;  // per layer [S]
  std::vector<std::vector<float>> gate;      // per layer [S]
  std::vector<uint8_t> dropped;              // [S] zeros (no capacity without a model)
};

// synthetic_index: the sample's rank among the run's synthetic samples (drives coverage).
SyntheticSample make_synthetic(uint64_t seed, int64_t synthetic_index, int64_t num_layers,
                               int64_t num_experts, int max_length, int64_t vocab_size);

}  // namespace moetrace
