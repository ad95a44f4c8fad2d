// A batch of pseudo-text for engine tests: right-padded random lengths (the first row full), ids
// skewed to small values like real text, each row ending in </s> (1). One copy for tests/cuda and
// tests/engine.
#pragma once

#include <cstdint>
#include <random>

#include "model/switch_model.h"

namespace moetrace::test {

inline Batch random_batch(int64_t B, int64_t S, int64_t vocab, uint64_t seed) {
  std::mt19937_64 rng(seed);
  Batch b;
  b.B = B;
  b.S = S;
  for (int64_t i = 0; i < B; ++i) {
    const int64_t len = i == 0 ? S : 1 + static_cast<int64_t>(rng() % static_cast<uint64_t>(S));
    for (int64_t s = 0; s < S; ++s) {
      const bool real = s < len;
      b.input_ids.push_back(
          real ? (s + 1 == len ? 1 : static_cast<int32_t>(2 + rng() % (vocab / 8))) : 0);
      b.attention_mask.push_back(real ? 1 : 0);
    }
  }
  return b;
}

}  // namespace moetrace::test
