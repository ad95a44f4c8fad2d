// The Switch router (softmax, top-1, per-sequence capacity) and the expert FFN over its choice.
#include <omp.h>

#include <algorithm>
#include <limits>
#include <numeric>
#include <vector>

#include "kernels/cpu/ops.h"

namespace moetrace::cpu {
namespace {

// Index of the first maximum of p[E] (strict >: ties keep the lowest index).
int64_t first_max(const float* p, int64_t E) {
  int64_t best = 0;
  for (int64_t e = 1; e < E; ++e) {
    if (p[e] > p[best]) best = e;
  }
  return best;
}

// Tokens of each expert, kept ones only, in position order.
std::vector<std::vector<int64_t>> tokens_by_expert(const int32_t* expert, const uint8_t* dropped,
                                                   int64_t T, int64_t E) {
  std::vector<std::vector<int64_t>> tokens(static_cast<size_t>(E));
  for (int64_t t = 0; t < T; ++t) {
    if (dropped[t]) continue;  // carried by the residual only
    tokens[static_cast<size_t>(expert[t])].push_back(t);
  }
  return tokens;
}

// Busiest experts first (longest-processing-time order): with one GEMM pair per thread, the
// dynamic schedule then balances the threads even when routing is skewed.
std::vector<int64_t> busiest_first(const std::vector<std::vector<int64_t>>& tokens) {
  std::vector<int64_t> order(tokens.size());
  std::iota(order.begin(), order.end(), int64_t{0});
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
    return tokens[static_cast<size_t>(a)].size() > tokens[static_cast<size_t>(b)].size();
  });
  return order;
}

// x[tok[r],:] += gate[tok[r]] · (act(relu(h[tok[r],:] · wiᵀ)) · woᵀ) for the ne tokens of one
// expert.
void expert_ffn(const float* h, int64_t K, int64_t F, const std::vector<int64_t>& tok,
                const ExpertWeightsFn& weights, int64_t e, const float* gate, DType act, float* x) {
  const int64_t ne = static_cast<int64_t>(tok.size());
  thread_local std::vector<float> in, mid, out, wi_scratch, wo_scratch;
  in.resize(static_cast<size_t>(ne * K));
  mid.resize(static_cast<size_t>(ne * F));
  out.resize(static_cast<size_t>(ne * K));
  for (int64_t r = 0; r < ne; ++r) std::copy_n(h + tok[r] * K, K, in.data() + r * K);
  const ExpertWeights w = weights(e, wi_scratch, wo_scratch);
  gemm_nt(ne, F, K, 1.0f, in.data(), K, w.wi, K, 0.0f, mid.data(), F);
  relu_inplace(mid.data(), ne * F, act);
  gemm_nt(ne, K, F, 1.0f, mid.data(), F, w.wo, F, 0.0f, out.data(), K);
  for (int64_t r = 0; r < ne; ++r) {
    const float g = gate[tok[r]];
    float* xr = x + tok[r] * K;
    const float* o = out.data() + r * K;
    for (int64_t j = 0; j < K; ++j) xr[j] += g * o[j];
  }
}

}  // namespace

void moe_route(const float* logits, int64_t B, int64_t S, int64_t E, int64_t capacity, DType act,
               int32_t* expert, uint8_t* dropped, float* gate, int32_t* counts) {
  std::vector<float> p(static_cast<size_t>(E));
  std::vector<int64_t> seen(static_cast<size_t>(E));
  for (int64_t b = 0; b < B; ++b) {
    std::fill(seen.begin(), seen.end(), 0);
    for (int64_t s = 0; s < S; ++s) {
      const int64_t t = b * S + s;
      std::copy_n(logits + t * E, E, p.data());
      softmax_rows(p.data(), 1, E);
      round_inplace(p.data(), E, act);
      const int64_t best = first_max(p.data(), E);
      expert[t] = static_cast<int32_t>(best);
      gate[t] = p[static_cast<size_t>(best)];
      dropped[t] = seen[static_cast<size_t>(best)]++ >= capacity ? 1 : 0;
      if (!dropped[t]) ++counts[best];
    }
  }
}

void moe_ffn(const float* h, int64_t T, int64_t K, int64_t F, int64_t E,
             const ExpertWeightsFn& weights, const int32_t* expert, const uint8_t* dropped,
             const float* gate, DType act, float* x) {
  const auto tokens = tokens_by_expert(expert, dropped, T, E);
  const std::vector<int64_t> order = busiest_first(tokens);
  const bool nested = omp_get_max_threads() > 1 && E > 1;
#pragma omp parallel for schedule(dynamic) if (nested)
  for (int64_t oi = 0; oi < E; ++oi) {
    const int64_t e = order[static_cast<size_t>(oi)];
    const auto& tok = tokens[static_cast<size_t>(e)];
    if (!tok.empty()) expert_ffn(h, K, F, tok, weights, e, gate, act, x);
  }
}

void greedy_pick(const float* logits, int64_t B, int64_t V, int32_t banned, int32_t eos,
                 int32_t pad, uint8_t* finished, int32_t* ids) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  for (int64_t b = 0; b < B; ++b) {
    const float* l = logits + b * V;
    auto at = [&](int64_t j) { return j == banned ? kNegInf : l[j]; };
    int64_t best = 0;  // the first maximum, as std::max_element
    for (int64_t j = 1; j < V; ++j) {
      if (at(best) < at(j)) best = j;
    }
    int32_t next = static_cast<int32_t>(best);
    if (finished[b]) next = pad;
    if (next == eos) finished[b] = 1;
    ids[b] = next;
  }
}

}  // namespace moetrace::cpu
