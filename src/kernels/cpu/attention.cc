// The attention ops: the softmax with position bias and masks, self-attention over packed qkv and
// attention of query rows over a key/value cache. One (sequence, head) pair per task: its scores
// [Sq, Sk] come from one GEMM, its context from another.
#include <omp.h>

#include <limits>
#include <vector>

#include "kernels/cpu/ops.h"

namespace moetrace::cpu {
namespace {

constexpr float kLowest = std::numeric_limits<float>::lowest();

// One (b, h) pair of an attention over Sq queries and Sk keys. bias(i, j) gives the position bias
// of query i and key j (0 without one); causal hides keys j > pos(i) = i + Sk - Sq.
struct Head {
  const float* q;  // row i at q + i*ldq
  int64_t ldq;
  const float* k;  // row j at k + j*ldkv, likewise v
  const float* v;
  int64_t ldkv;
  const int32_t* mask;  // [Sk] or null
  float* ctx;           // row i at ctx + i*ldctx
  int64_t ldctx;
};

// scores [Sq, Sk] += bias + masks, row by row: the lowest float for a padded key and for a key
// after the query (causal), as HF's finite mask.
template <class Bias>
void add_bias_and_masks(float* scores, int64_t Sq, int64_t Sk, const int32_t* mask, bool causal,
                        const Bias& bias) {
  for (int64_t i = 0; i < Sq; ++i) {
    float* s = scores + i * Sk;
    const int64_t pos = i + Sk - Sq;
    for (int64_t j = 0; j < Sk; ++j) {
      const bool hidden = (mask != nullptr && mask[j] == 0) || (causal && j > pos);
      s[j] += hidden ? kLowest : bias(i, j);
    }
  }
}

// ctx [Sq, dk] = act(act(softmax(q·kᵀ + bias + masks)) · v) for one head; scores is [Sq, Sk]
// scratch.
template <class Bias>
void attend_head(const Head& a, int64_t Sq, int64_t Sk, int64_t dk, bool causal, const Bias& bias,
                 DType act, float* scores) {
  gemm_nt(Sq, Sk, dk, 1.0f, a.q, a.ldq, a.k, a.ldkv, 0.0f, scores, Sk);
  add_bias_and_masks(scores, Sq, Sk, a.mask, causal, bias);
  softmax_rows(scores, Sq, Sk);
  round_inplace(scores, Sq * Sk, act);
  gemm_nn(Sq, dk, Sk, 1.0f, scores, Sk, a.v, a.ldkv, 0.0f, a.ctx, a.ldctx);
  for (int64_t i = 0; i < Sq; ++i) round_inplace(a.ctx + i * a.ldctx, dk, act);
}

// Runs head(b, h, scores) for every (b, h) pair in parallel, each thread with its own scores.
template <class HeadFn>
void for_each_head(int64_t B, int64_t H, int64_t Sq, int64_t Sk, const HeadFn& head) {
#pragma omp parallel
  {
    std::vector<float> scores(static_cast<size_t>(Sq * Sk));
#pragma omp for schedule(dynamic)
    for (int64_t bh = 0; bh < B * H; ++bh) head(bh / H, bh % H, scores.data());
  }
}

}  // namespace

void attention_softmax(const float* scores, const float* bias, const int32_t* mask, bool causal,
                       int64_t B, int64_t H, int64_t Sq, int64_t Sk, float* probs, DType act) {
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t h = 0; h < H; ++h) {
      const int64_t off = (b * H + h) * Sq * Sk;
      if (probs != scores) std::copy_n(scores + off, Sq * Sk, probs + off);
      const float* bias_h = bias != nullptr ? bias + h * (2 * Sk - 1) + Sk - 1 : nullptr;
      auto bias_of = [&](int64_t i, int64_t j) { return bias_h != nullptr ? bias_h[j - i] : 0.f; };
      add_bias_and_masks(probs + off, Sq, Sk, mask != nullptr ? mask + b * Sk : nullptr, causal,
                         bias_of);
      softmax_rows(probs + off, Sq, Sk);
      round_inplace(probs + off, Sq * Sk, act);
    }
  }
}

void attention(const float* qkv, const float* bias, const int32_t* mask, bool causal, int64_t B,
               int64_t S, int64_t H, int64_t dk, float* ctx, DType act) {
  const int64_t inner = H * dk, ld = 3 * inner;
  for_each_head(B, H, S, S, [&](int64_t b, int64_t h, float* scores) {
    const float* q = qkv + b * S * ld + h * dk;
    const Head head{q,
                    ld,
                    q + inner,
                    q + 2 * inner,
                    ld,
                    mask != nullptr ? mask + b * S : nullptr,
                    ctx + b * S * inner + h * dk,
                    inner};
    const float* bias_h = bias != nullptr ? bias + h * (2 * S - 1) + S - 1 : nullptr;
    auto bias_of = [&](int64_t i, int64_t j) { return bias_h != nullptr ? bias_h[j - i] : 0.f; };
    attend_head(head, S, S, dk, causal, bias_of, act, scores);
  });
}

void decode_attention(const float* q, int64_t ldq, const float* k, const float* v, int64_t ldkv,
                      int64_t kv_bstride, const float* bias_dist, int64_t bias_ld,
                      const int32_t* mask, bool causal, int64_t B, int64_t H, int64_t Sq,
                      int64_t Sk, int64_t dk, float* ctx, int64_t ldctx, DType act) {
  for_each_head(B, H, Sq, Sk, [&](int64_t b, int64_t h, float* scores) {
    const int64_t kv_off = b * kv_bstride + h * dk;
    const Head head{q + b * Sq * ldq + h * dk,
                    ldq,
                    k + kv_off,
                    v + kv_off,
                    ldkv,
                    mask != nullptr ? mask + b * Sk : nullptr,
                    ctx + b * Sq * ldctx + h * dk,
                    ldctx};
    const float* bias_h = bias_dist != nullptr ? bias_dist + h * bias_ld : nullptr;
    // Key j of query i lies pos - j positions behind it; keys ahead are hidden when causal.
    auto bias_of = [&](int64_t i, int64_t j) {
      const int64_t behind = i + Sk - Sq - j;
      return bias_h != nullptr && behind >= 0 ? bias_h[behind] : 0.f;
    };
    attend_head(head, Sq, Sk, dk, causal, bias_of, act, scores);
  });
}

}  // namespace moetrace::cpu
