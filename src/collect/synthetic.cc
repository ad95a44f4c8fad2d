#include "collect/synthetic.h"

#include <algorithm>
#include <cmath>

#include "data/plan.h"

namespace moetrace {

namespace {

// Deterministic stream from (seed, sample, purpose) so samples are independent of each other.
struct Rng {
  uint64_t state;
  uint64_t next() { return state = mix64(state + 0x9e3779b97f4a7c15ull); }
  double uniform() { return static_cast<double>(next() >> 11) * (1.0 / 9007199254740992.0); }
  float normal() {
    const double u1 = std::max(uniform(), 1e-300), u2 = uniform();
    return static_cast<float>(std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2));
  }
};

constexpr float kFavourBoost = 3.0f;  // logit added to the favoured expert: it wins most tokens

}  // namespace

SyntheticSample make_synthetic(uint64_t seed, int64_t synthetic_index, int64_t num_layers,
                               int64_t num_experts, int max_length, int64_t vocab_size) {
  Rng rng{mix64(seed ^ mix64(static_cast<uint64_t>(synthetic_index) + 0x5eedull))};
  SyntheticSample s;
  const int lo = std::min(8, max_length);
  const int len = lo + static_cast<int>(rng.next() % static_cast<uint64_t>(max_length - lo + 1));
  const int64_t vocab = std::min<int64_t>(vocab_size, 32000);
  for (int i = 0; i + 1 < len; ++i)
    s.token_ids.push_back(static_cast<int32_t>(3 + rng.next() % (vocab - 3)));
  s.token_ids.push_back(1);
  const int64_t S = static_cast<int64_t>(s.token_ids.size()), E = num_experts;
  s.dropped.assign(static_cast<size_t>(S), 0);
  for (int64_t l = 0; l < num_layers; ++l) {
    const int64_t trace = synthetic_index * num_layers + l;
    const int64_t favoured =
        trace < E ? trace : static_cast<int64_t>(rng.next() % static_cast<uint64_t>(E));
    std::vector<float> logits(static_cast<size_t>(S * E));
    std::vector<int32_t> expert(static_cast<size_t>(S));
    std::vector<float> gate(static_cast<size_t>(S));
    for (int64_t t = 0; t < S; ++t) {
      float* row = logits.data() + t * E;
      for (int64_t e = 0; e < E; ++e) row[e] = rng.normal();
      row[favoured] += kFavourBoost;
      const int64_t best = std::max_element(row, row + E) - row;
      double sum = 0;
      for (int64_t e = 0; e < E; ++e) sum += std::exp(static_cast<double>(row[e] - row[best]));
      expert[t] = static_cast<int32_t>(best);
      gate[t] = static_cast<float>(1.0 / sum);
    }
    s.logits.push_back(std::move(logits));
    s.expert.push_back(std::move(expert));
    s.gate.push_back(std::move(gate));
  }
  return s;
}

}  // namespace moetrace
