// The CPU twins of the language models' GPU ops: RoPE tables, q/k preparation, causal grouped-query
// attention, the top-k router, the SwiGLU experts and their combine.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

#include "kernels/cpu/ops.h"

namespace moetrace::cpu {
namespace {

constexpr float kLowest = std::numeric_limits<float>::lowest();

float silu(float g) { return g / (1.f + std::exp(-g)); }

// x[0..n) = w * x * rsqrt(mean(x²) + eps), the sum of squares in float32 in column order.
void rms_inplace(float* x, int64_t n, const float* w, float eps) {
  float ss = 0.f;
  for (int64_t c = 0; c < n; ++c) ss += x[c] * x[c];
  const float scale = 1.0f / std::sqrt(ss / static_cast<float>(n) + eps);
  for (int64_t c = 0; c < n; ++c) x[c] = w[c] * (x[c] * scale);
}

}  // namespace

void rope_table(const std::vector<float>& inv_freq, int64_t P, std::vector<float>& cos,
                std::vector<float>& sin) {
  const auto half = static_cast<int64_t>(inv_freq.size());
  cos.resize(static_cast<size_t>(P * half));
  sin.resize(static_cast<size_t>(P * half));
  for (int64_t p = 0; p < P; ++p) {
    for (int64_t c = 0; c < half; ++c) {
      const float angle = static_cast<float>(p) * inv_freq[static_cast<size_t>(c)];
      cos[p * half + c] = std::cos(angle);
      sin[p * half + c] = std::sin(angle);
    }
  }
}

void lm_qkv_rope(const float* qkv, const float* bias, float clip, QkNormKind norm,
                 const float* q_norm, const float* k_norm, float eps, const int32_t* pos,
                 const float* cos, const float* sin, float q_scale, int64_t B, int64_t Sq,
                 int64_t H, int64_t KV, int64_t hd, float* q, int64_t ldq, float* kv, int64_t ldkv,
                 int64_t kv_bstride, int64_t t0, DType act) {
  const int64_t qn = H * hd, kn = KV * hd, cols = qn + 2 * kn, half = hd / 2;
#pragma omp parallel for schedule(static) if (B * Sq * cols > 65536)
  for (int64_t t = 0; t < B * Sq; ++t) {
    const int64_t b = t / Sq, s = t % Sq;
    std::vector<float> row(qkv + t * cols, qkv + (t + 1) * cols);
    if (bias != nullptr)
      for (int64_t c = 0; c < cols; ++c) row[c] += bias[c];
    if (norm == QkNormKind::kFull) {
      rms_inplace(row.data(), qn, q_norm, eps);
      rms_inplace(row.data() + qn, kn, k_norm, eps);
    } else if (norm == QkNormKind::kPerHead) {
      for (int64_t hh = 0; hh < H + KV; ++hh)
        rms_inplace(row.data() + hh * hd, hd, hh < H ? q_norm : k_norm, eps);
    }
    if (clip > 0.f)
      for (int64_t c = 0; c < cols; ++c) row[c] = std::min(std::max(row[c], -clip), clip);
    const float* co = cos + static_cast<int64_t>(pos[t]) * half;
    const float* si = sin + static_cast<int64_t>(pos[t]) * half;
    float* qrow = q + t * ldq;
    float* krow = kv + b * kv_bstride + (t0 + s) * ldkv;
    for (int64_t hh = 0; hh < H + KV; ++hh) {
      for (int64_t c = 0; c < half; ++c) {
        const float x1 = row[hh * hd + c], x2 = row[hh * hd + c + half];
        const float y1 = x1 * co[c] - x2 * si[c];
        const float y2 = x2 * co[c] + x1 * si[c];
        if (hh < H) {
          qrow[hh * hd + c] = round_to(y1 * q_scale, act);
          qrow[hh * hd + c + half] = round_to(y2 * q_scale, act);
        } else {
          krow[(hh - H) * hd + c] = round_to(y1, act);
          krow[(hh - H) * hd + c + half] = round_to(y2, act);
        }
      }
    }
    for (int64_t c = 0; c < kn; ++c) krow[kn + c] = round_to(row[qn + kn + c], act);
  }
}

void lm_attention(const float* q, int64_t ldq, const float* k, const float* v, int64_t ldkv,
                  int64_t kv_bstride, const int32_t* mask, int64_t mask_ld, int64_t window,
                  int64_t B, int64_t H, int64_t KV, int64_t Sq, int64_t Sk, int64_t hd, float* ctx,
                  int64_t ldctx, DType act) {
  const int64_t G = H / KV;
#pragma omp parallel
  {
    std::vector<float> p(static_cast<size_t>(Sk));
#pragma omp for schedule(dynamic)
    for (int64_t bh = 0; bh < B * H; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      const int64_t kv_off = b * kv_bstride + (h / G) * hd;
      for (int64_t i = 0; i < Sq; ++i) {
        const float* qr = q + (b * Sq + i) * ldq + h * hd;
        const int64_t pos = i + Sk - Sq;
        const int64_t j0 = window > 0 ? std::max<int64_t>(0, pos - window + 1) : 0;
        float mx = -std::numeric_limits<float>::infinity();
        for (int64_t j = j0; j <= pos; ++j) {
          const float* kr = k + kv_off + j * ldkv;
          float acc = 0.f;
          for (int64_t c = 0; c < hd; ++c) acc += qr[c] * kr[c];
          if (mask != nullptr && mask[b * mask_ld + j] == 0) acc += kLowest;
          p[j] = acc;
          mx = std::max(mx, acc);
        }
        float sum = 0.f;
        for (int64_t j = j0; j <= pos; ++j) sum += (p[j] = std::exp(p[j] - mx));
        const float inv = 1.f / sum;
        for (int64_t j = j0; j <= pos; ++j) p[j] = round_to(p[j] * inv, act);
        float* out = ctx + (b * Sq + i) * ldctx + h * hd;
        for (int64_t c = 0; c < hd; ++c) {
          float acc = 0.f;
          for (int64_t j = j0; j <= pos; ++j) acc += p[j] * v[kv_off + j * ldkv + c];
          out[c] = round_to(acc, act);
        }
      }
    }
  }
}

void moe_topk(const float* logits, int64_t T, int64_t E, int64_t k, bool renorm, int32_t* expert,
              float* weight, int32_t* counts) {
  std::vector<float> p(static_cast<size_t>(E));
  for (int64_t t = 0; t < T; ++t) {
    std::copy_n(logits + t * E, E, p.data());
    float mx = -std::numeric_limits<float>::infinity();
    for (float v : p) mx = std::max(mx, v);
    float z = 0.f;
    for (float& v : p) z += (v = std::exp(v - mx));
    for (float& v : p) v /= z;
    float sum = 0.f;
    for (int64_t j = 0; j < k; ++j) {
      int64_t best = -1;
      for (int64_t e = 0; e < E; ++e) {  // strict >: ties keep the lowest index
        if (p[e] >= 0.f && (best < 0 || p[e] > p[best])) best = e;
      }
      expert[t * k + j] = static_cast<int32_t>(best);
      weight[t * k + j] = p[best];
      sum += p[best];
      p[best] = -1.f;  // taken (probabilities are >= 0)
      ++counts[best];
    }
    if (renorm) {
      for (int64_t j = 0; j < k; ++j) weight[t * k + j] = weight[t * k + j] / sum;
    }
  }
}

void moe_swiglu_experts(const float* h, int64_t T, int64_t d, int64_t F, int64_t E, int64_t k,
                        const SwiGluWeightsFn& weights, const int32_t* expert, DType act,
                        float* rows) {
  std::vector<std::vector<int64_t>> slots(static_cast<size_t>(E));
  for (int64_t s = 0; s < T * k; ++s) slots[static_cast<size_t>(expert[s])].push_back(s);
#pragma omp parallel for schedule(dynamic) if (E > 1)
  for (int64_t e = 0; e < E; ++e) {
    const auto& sl = slots[static_cast<size_t>(e)];
    if (sl.empty()) continue;
    const auto n = static_cast<int64_t>(sl.size());
    std::vector<float> in(static_cast<size_t>(n * d)), gu(static_cast<size_t>(n * 2 * F)),
        mid(static_cast<size_t>(n * F)), out(static_cast<size_t>(n * d)), gu_scratch, down_scratch;
    for (int64_t r = 0; r < n; ++r) std::copy_n(h + (sl[r] / k) * d, d, in.data() + r * d);
    const SwiGluWeights w = weights(e, gu_scratch, down_scratch);
    gemm_nt(n, 2 * F, d, 1.0f, in.data(), d, w.gate_up, d, 0.0f, gu.data(), 2 * F);
    swiglu(gu.data(), n, F, mid.data(), act);
    gemm_nt(n, d, F, 1.0f, mid.data(), F, w.down, F, 0.0f, out.data(), d);
    for (int64_t r = 0; r < n; ++r) std::copy_n(out.data() + r * d, d, rows + sl[r] * d);
  }
}

void moe_combine(const float* rows, const float* weight, int64_t T, int64_t k, int64_t d,
                 const float* shared, const float* shared_gate, DType act, float* x) {
#pragma omp parallel for schedule(static) if (T * d > 65536)
  for (int64_t t = 0; t < T; ++t) {
    const float sg = shared != nullptr ? 1.f / (1.f + std::exp(-shared_gate[t])) : 0.f;
    for (int64_t c = 0; c < d; ++c) {
      float acc = 0.f;
      for (int64_t j = 0; j < k; ++j)
        acc += round_to(weight[t * k + j], act) * rows[(t * k + j) * d + c];
      if (shared != nullptr) acc += sg * shared[t * d + c];
      x[t * d + c] += acc;
    }
  }
}

void swiglu(const float* in, int64_t rows, int64_t F, float* out, DType act) {
#pragma omp parallel for schedule(static) if (rows * F > 65536)
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t f = 0; f < F; ++f) {
      const float g = in[r * 2 * F + 2 * f], u = in[r * 2 * F + 2 * f + 1];
      out[r * F + f] = round_to(silu(g) * u, act);
    }
  }
}

void fill_uniform(float* dst, int64_t n, DType act, uint64_t seed, float lo, float hi) {
  for (int64_t i = 0; i < n; ++i)
    dst[i] = round_to(lo + (hi - lo) * uniform_hash(seed, static_cast<uint64_t>(i)), act);
}

}  // namespace moetrace::cpu
