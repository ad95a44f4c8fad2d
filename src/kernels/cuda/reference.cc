#include "kernels/cuda/reference.h"

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdlib>

namespace moetrace::cuda::ref {

void embed(const std::vector<int32_t>& ids, const std::vector<float>& table, int64_t d,
           std::vector<float>& x) {
  x.assign(ids.size() * static_cast<size_t>(d), 0.f);
  for (size_t t = 0; t < ids.size(); ++t)
    std::copy_n(table.begin() + ids[t] * d, d, x.begin() + static_cast<int64_t>(t) * d);
}

void rmsnorm(const std::vector<float>& x, const std::vector<float>& w, int64_t rows, int64_t d,
             float eps, std::vector<float>& out) {
  out.resize(static_cast<size_t>(rows * d));
  for (int64_t r = 0; r < rows; ++r) {
    double ss = 0;
    for (int64_t c = 0; c < d; ++c) ss += static_cast<double>(x[r * d + c]) * x[r * d + c];
    const float scale = 1.f / std::sqrt(static_cast<float>(ss / static_cast<double>(d)) + eps);
    for (int64_t c = 0; c < d; ++c) out[r * d + c] = w[c] * (x[r * d + c] * scale);
  }
}

void attention_softmax(const std::vector<float>& scores, const float* bias, const int32_t* mask,
                       bool causal, int64_t B, int64_t H, int64_t Sq, int64_t Sk,
                       std::vector<float>& probs) {
  probs.resize(scores.size());
  std::vector<float> v(static_cast<size_t>(Sk));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t i = 0; i < Sq; ++i) {
        const int64_t row = (b * H + h) * Sq + i;
        float mx = -INFINITY;
        for (int64_t j = 0; j < Sk; ++j) {
          float s = scores[row * Sk + j];
          if (bias) s += bias[h * (2 * Sk - 1) + j - i + Sk - 1];
          if (mask && mask[b * Sk + j] == 0) s += -FLT_MAX;
          if (causal && j > i) s += -FLT_MAX;
          v[j] = s;
          mx = std::max(mx, s);
        }
        double sum = 0;
        for (int64_t j = 0; j < Sk; ++j) sum += std::exp(static_cast<double>(v[j] - mx));
        for (int64_t j = 0; j < Sk; ++j)
          probs[row * Sk + j] = static_cast<float>(std::exp(static_cast<double>(v[j] - mx)) / sum);
      }
}

void decode_attention(const std::vector<float>& q, int64_t ldq, const float* k, const float* v,
                      int64_t ldkv, int64_t kv_bstride, const float* bias_dist, int64_t bias_ld,
                      const int32_t* mask, bool causal, int64_t B, int64_t H, int64_t Sq,
                      int64_t Sk, int64_t dk, DType act, std::vector<float>& ctx, int64_t ldctx) {
  ctx.resize(static_cast<size_t>(B * Sq * ldctx));
  std::vector<double> s(static_cast<size_t>(Sk));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t i = 0; i < Sq; ++i) {
        const int64_t pos = i + Sk - Sq, n_keys = causal ? pos + 1 : Sk;
        const float* qr = q.data() + (b * Sq + i) * ldq + h * dk;
        double mx = -INFINITY;
        for (int64_t j = 0; j < n_keys; ++j) {
          const float* kr = k + b * kv_bstride + j * ldkv + h * dk;
          double acc = 0;
          for (int64_t c = 0; c < dk; ++c) acc += static_cast<double>(qr[c]) * kr[c];
          if (bias_dist) acc += bias_dist[h * bias_ld + pos - j];
          if (mask && mask[b * Sk + j] == 0) acc += -FLT_MAX;
          s[j] = acc;
          mx = std::max(mx, acc);
        }
        double sum = 0;
        for (int64_t j = 0; j < n_keys; ++j) sum += std::exp(s[j] - mx);
        float* out = ctx.data() + (b * Sq + i) * ldctx + h * dk;
        std::vector<double> acc(static_cast<size_t>(dk), 0.0);
        for (int64_t j = 0; j < n_keys; ++j) {
          const double p = round_to(static_cast<float>(std::exp(s[j] - mx) / sum), act);
          const float* vr = v + b * kv_bstride + j * ldkv + h * dk;
          for (int64_t c = 0; c < dk; ++c) acc[c] += p * vr[c];
        }
        for (int64_t c = 0; c < dk; ++c) out[c] = static_cast<float>(acc[c]);
      }
}

void greedy_pick(const std::vector<float>& logits, int64_t B, int64_t V, int32_t banned,
                 int32_t eos, int32_t pad, std::vector<uint8_t>& finished,
                 std::vector<int32_t>& ids) {
  ids.assign(static_cast<size_t>(B), 0);
  std::vector<float> row(static_cast<size_t>(V));
  for (int64_t b = 0; b < B; ++b) {
    std::copy_n(logits.begin() + b * V, V, row.begin());
    if (banned >= 0 && banned < V) row[banned] = -INFINITY;
    int32_t next = static_cast<int32_t>(std::max_element(row.begin(), row.end()) - row.begin());
    if (finished[b]) next = pad;
    if (next == eos) finished[b] = 1;
    ids[b] = next;
  }
}

void moe_route(const std::vector<float>& logits, int64_t B, int64_t S, int64_t E, int64_t capacity,
               DType act, std::vector<int32_t>& expert, std::vector<uint8_t>& dropped,
               std::vector<float>& gate, std::vector<int32_t>& counts) {
  const int64_t T = B * S;
  expert.assign(T, 0);
  dropped.assign(T, 0);
  gate.assign(T, 0.f);
  counts.assign(E, 0);
  std::vector<float> p(static_cast<size_t>(E));
  for (int64_t b = 0; b < B; ++b) {
    std::vector<int64_t> seen(static_cast<size_t>(E), 0);
    for (int64_t s = 0; s < S; ++s) {
      const int64_t t = b * S + s;
      const float* l = logits.data() + t * E;
      const float mx = *std::max_element(l, l + E);
      float sum = 0.f;
      for (int64_t e = 0; e < E; ++e) sum += (p[e] = std::exp(l[e] - mx));
      int64_t best = 0;
      for (int64_t e = 0; e < E; ++e) {
        p[e] = round_to(p[e] / sum, act);
        if (p[e] > p[best]) best = e;
      }
      expert[t] = static_cast<int32_t>(best);
      gate[t] = p[best];
      dropped[t] = seen[best]++ >= capacity ? 1 : 0;
      if (!dropped[t]) ++counts[best];
    }
  }
}

void moe_ffn(const std::vector<float>& h, const std::vector<float>& wi,
             const std::vector<float>& wo, const std::vector<int32_t>& expert,
             const std::vector<uint8_t>& dropped, const std::vector<float>& gate, int64_t T,
             int64_t K, int64_t F, DType act, std::vector<float>& x) {
  std::vector<float> inner(static_cast<size_t>(F));
  for (int64_t t = 0; t < T; ++t) {
    if (dropped[t]) continue;
    const int64_t e = expert[t];
    for (int64_t f = 0; f < F; ++f) {
      double acc = 0;
      for (int64_t k = 0; k < K; ++k)
        acc += static_cast<double>(h[t * K + k]) * wi[(e * F + f) * K + k];
      inner[f] = round_to(std::max(static_cast<float>(acc), 0.f), act);
    }
    for (int64_t k = 0; k < K; ++k) {
      double acc = 0;
      for (int64_t f = 0; f < F; ++f)
        acc += static_cast<double>(inner[f]) * wo[(e * K + k) * F + f];
      x[t * K + k] += gate[t] * static_cast<float>(acc);
    }
  }
}

int64_t relative_bucket(int64_t rp, bool bidirectional, int64_t num_buckets, int64_t max_distance) {
  int64_t bucket = 0, nb = num_buckets, a;
  if (bidirectional) {
    nb /= 2;
    if (rp > 0) bucket += nb;
    a = std::llabs(rp);
  } else {
    a = std::max<int64_t>(-rp, 0);
  }
  const int64_t max_exact = nb / 2;
  if (a < max_exact) return bucket + a;
  const float r = std::log(static_cast<float>(a) / static_cast<float>(max_exact)) /
                  std::log(static_cast<float>(max_distance) / static_cast<float>(max_exact)) *
                  static_cast<float>(nb - max_exact);
  return bucket + std::min<int64_t>(max_exact + static_cast<int64_t>(r), nb - 1);
}

}  // namespace moetrace::cuda::ref
