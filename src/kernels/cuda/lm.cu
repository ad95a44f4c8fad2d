// The pieces of the decoder-only MoE language models that Switch does not have: q/k preparation
// (bias, q/k RMS norms, clip, RoPE, the attention scale) straight into the KV cache, causal
// grouped-query attention over the cache, the top-k router, the deterministic top-k combine,
// SwiGLU, and small row helpers.
#include <algorithm>

#include "kernels/cuda/common.h"
#include "kernels/cuda/device_types.cuh"
#include "kernels/cuda/ops.h"

namespace moetrace::cuda {
namespace {

constexpr int kQkvThreads = 256;
constexpr int64_t kMaxQkvCols = 12288;  // (H + 2*KV)*hd floats in shared memory: 48 KiB
constexpr int kMaxHd = 256;
constexpr int kTopkWarps = 8;
constexpr int kMaxExpertsPerLane = 8;  // E <= 256
constexpr int kMaxTopK = 32;

// One block per token: the row in shared memory through bias, the norms and clip, then RoPE and
// the scale on the way out.
template <class T>
__global__ void __launch_bounds__(kQkvThreads)
    lm_qkv_rope_kernel(const float* qkv, const float* bias, float clip, QkNormKind norm,
                       const float* q_norm, const float* k_norm, float eps, const int32_t* pos,
                       const float* cos_t, const float* sin_t, float q_scale, int Sq, int H, int KV,
                       int hd, T* q, int64_t ldq, T* kv, int64_t ldkv, int64_t kv_bstride,
                       int64_t t0) {
  extern __shared__ float row[];  // [cols] then the reduction scratch [32]
  const int64_t t = blockIdx.x;
  const int64_t b = t / Sq, s = t % Sq;
  const int qn = H * hd, kn = KV * hd, cols = qn + 2 * kn, half = hd / 2;
  float* red = row + cols;
  const float* in = qkv + t * cols;
  for (int c = threadIdx.x; c < cols; c += blockDim.x) {
    float v = in[c];
    if (bias) v += bias[c];
    row[c] = v;
  }
  __syncthreads();
  if (norm == QkNormKind::kFull) {
    float sq = 0.f, sk = 0.f;
    for (int c = threadIdx.x; c < qn; c += blockDim.x) sq += row[c] * row[c];
    for (int c = threadIdx.x; c < kn; c += blockDim.x) sk += row[qn + c] * row[qn + c];
    sq = block_sum(sq, red);
    sk = block_sum(sk, red);
    const float scale_q = rsqrtf(sq / static_cast<float>(qn) + eps);
    const float scale_k = rsqrtf(sk / static_cast<float>(kn) + eps);
    for (int c = threadIdx.x; c < qn; c += blockDim.x) row[c] = q_norm[c] * (row[c] * scale_q);
    for (int c = threadIdx.x; c < kn; c += blockDim.x)
      row[qn + c] = k_norm[c] * (row[qn + c] * scale_k);
    __syncthreads();
  } else if (norm == QkNormKind::kPerHead) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, n_warps = blockDim.x / 32;
    for (int hh = warp; hh < H + KV; hh += n_warps) {
      float* x = row + hh * hd;
      float ss = 0.f;
      for (int c = lane; c < hd; c += 32) ss += x[c] * x[c];
      ss = warp_sum(ss);
      const float scale = rsqrtf(ss / static_cast<float>(hd) + eps);
      const float* w = hh < H ? q_norm : k_norm;
      __syncwarp();
      for (int c = lane; c < hd; c += 32) x[c] = w[c] * (x[c] * scale);
    }
    __syncthreads();
  }
  if (clip > 0.f) {  // olmoe's clip_qkv: after the norms
    for (int c = threadIdx.x; c < cols; c += blockDim.x) row[c] = fminf(fmaxf(row[c], -clip), clip);
    __syncthreads();
  }
  const int p = pos[t];
  const float* co = cos_t + static_cast<int64_t>(p) * half;
  const float* si = sin_t + static_cast<int64_t>(p) * half;
  T* qrow = q + t * ldq;
  T* krow = kv + b * kv_bstride + (t0 + s) * ldkv;
  for (int i = threadIdx.x; i < (H + KV) * half; i += blockDim.x) {
    const int hh = i / half, c = i % half;
    const float x1 = row[hh * hd + c], x2 = row[hh * hd + c + half];
    float y1 = x1 * co[c] - x2 * si[c];
    float y2 = x2 * co[c] + x1 * si[c];
    if (hh < H) {
      qrow[hh * hd + c] = from_f32<T>(y1 * q_scale);
      qrow[hh * hd + c + half] = from_f32<T>(y2 * q_scale);
    } else {
      const int kh = hh - H;
      krow[kh * hd + c] = from_f32<T>(y1);
      krow[kh * hd + c + half] = from_f32<T>(y2);
    }
  }
  for (int c = threadIdx.x; c < kn; c += blockDim.x) krow[kn + c] = from_f32<T>(row[qn + kn + c]);
}

// Grid (Sq, H, B); shared memory: q [hd] | scores [Sk] | red [32] | partial sums [parts * hd].
template <class T>
__global__ void lm_attention_kernel(const T* q, int64_t ldq, const T* k, const T* v, int64_t ldkv,
                                    int64_t kv_bstride, const int32_t* mask, int64_t mask_ld,
                                    int window, int G, int Sq, int Sk, int hd, T* ctx,
                                    int64_t ldctx) {
  extern __shared__ float sm[];
  float* qs = sm;
  float* sc = qs + hd;
  float* red = sc + Sk;
  float* part = red + 32;
  const int i = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32, n_warps = blockDim.x / 32;
  const T* qrow = q + (static_cast<int64_t>(b) * Sq + i) * ldq + static_cast<int64_t>(h) * hd;
  for (int c = tid; c < hd; c += blockDim.x) qs[c] = to_f32(qrow[c]);
  __syncthreads();
  const int pos = i + Sk - Sq;
  const int j0 = window > 0 ? max(0, pos - window + 1) : 0;
  const int n_keys = pos + 1 - j0;  // keys j0 .. pos, at sc[j - j0]
  const int64_t kv_off = static_cast<int64_t>(b) * kv_bstride + static_cast<int64_t>(h / G) * hd;
  const T* kb = k + kv_off;
  const T* vb = v + kv_off;
  const int32_t* mb = mask ? mask + static_cast<int64_t>(b) * mask_ld : nullptr;
  for (int jj = warp; jj < n_keys; jj += n_warps) {
    const int j = j0 + jj;
    const T* kr = kb + static_cast<int64_t>(j) * ldkv;
    float acc = 0.f;
    for (int c = lane; c < hd; c += 32) acc += qs[c] * to_f32(kr[c]);
    acc = warp_sum(acc);
    if (lane == 0) {
      if (mb && mb[j] == 0) acc += -FLT_MAX;  // HF's finite mask
      sc[jj] = acc;
    }
  }
  __syncthreads();
  float mx = -INFINITY;
  for (int jj = tid; jj < n_keys; jj += blockDim.x) mx = fmaxf(mx, sc[jj]);
  mx = block_max(mx, red);
  float sum = 0.f;
  for (int jj = tid; jj < n_keys; jj += blockDim.x) {
    const float e = expf(sc[jj] - mx);
    sc[jj] = e;
    sum += e;
  }
  sum = block_sum(sum, red);
  const float inv = 1.f / sum;
  for (int jj = tid; jj < n_keys; jj += blockDim.x) sc[jj] = round_to<T>(sc[jj] * inv);
  __syncthreads();
  const int parts = blockDim.x / hd;
  if (tid < parts * hd) {
    const int c = tid % hd, pt = tid / hd;
    float acc = 0.f;
    for (int jj = pt; jj < n_keys; jj += parts)
      acc += sc[jj] * to_f32(vb[static_cast<int64_t>(j0 + jj) * ldkv + c]);
    part[pt * hd + c] = acc;
  }
  __syncthreads();
  for (int c = tid; c < hd; c += blockDim.x) {
    float acc = 0.f;
    for (int pt = 0; pt < parts; ++pt) acc += part[pt * hd + c];
    ctx[(static_cast<int64_t>(b) * Sq + i) * ldctx + static_cast<int64_t>(h) * hd + c] =
        from_f32<T>(acc);
  }
}

// One warp per token: softmax over the experts in registers, then k rounds of a warp argmax.
__global__ void __launch_bounds__(kTopkWarps * 32)
    moe_topk_kernel(const float* logits, int64_t T, int E, int k, bool renorm, int32_t* expert,
                    float* weight, int32_t* counts) {
  const int64_t t = blockIdx.x * static_cast<int64_t>(kTopkWarps) + threadIdx.x / 32;
  if (t >= T) return;
  const int lane = threadIdx.x % 32;
  const float* l = logits + t * E;
  float p[kMaxExpertsPerLane];
#pragma unroll
  for (int u = 0; u < kMaxExpertsPerLane; ++u) {
    const int e = u * 32 + lane;
    p[u] = e < E ? l[e] : -INFINITY;
  }
  const float sum = warp_softmax_exp(p, E, lane);
#pragma unroll
  for (int u = 0; u < kMaxExpertsPerLane; ++u) p[u] = u * 32 + lane < E ? p[u] / sum : -INFINITY;
  int32_t* ex = expert + t * k;
  float* w = weight + t * k;
  for (int j = 0; j < k; ++j) {
    float best = -INFINITY;
    int best_e = E;
#pragma unroll
    for (int u = 0; u < kMaxExpertsPerLane; ++u) {
      if (p[u] > best) {  // u ascending: the first maximum is this lane's lowest index
        best = p[u];
        best_e = u * 32 + lane;
      }
    }
    warp_argmax(best, best_e);
#pragma unroll
    for (int u = 0; u < kMaxExpertsPerLane; ++u)
      if (u * 32 + lane == best_e) p[u] = -INFINITY;
    if (lane == 0) {
      ex[j] = best_e;
      w[j] = best;
      atomicAdd(&counts[best_e], 1);
    }
  }
  if (renorm && lane == 0) {
    float s = 0.f;
    for (int j = 0; j < k; ++j) s += w[j];
    for (int j = 0; j < k; ++j) w[j] = w[j] / s;
  }
}

template <class T>
__global__ void moe_combine_kernel(const float* rows, const float* weight, int k, int64_t d,
                                   const float* shared, const float* shared_gate, float* x) {
  const int64_t t = blockIdx.x;
  const float* w = weight + t * k;
  const float sg = shared ? 1.f / (1.f + expf(-shared_gate[t])) : 0.f;
  for (int64_t c = threadIdx.x; c < d; c += blockDim.x) {
    float acc = 0.f;
    for (int j = 0; j < k; ++j) acc += round_to<T>(w[j]) * rows[(t * k + j) * d + c];
    if (shared) acc += sg * shared[t * d + c];
    x[t * d + c] += acc;
  }
}

template <class T>
__global__ void swiglu_kernel(const float* in, int64_t n, int64_t F, T* out) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / F, f = i % F;
    const float g = in[r * 2 * F + 2 * f], u = in[r * 2 * F + 2 * f + 1];
    out[i] = from_f32<T>(g / (1.f + expf(-g)) * u);
  }
}

__global__ void add_bias_kernel(float* x, const float* bias, int64_t n, int64_t d) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    x[i] += bias[i % d];
}

__global__ void gather_rows_kernel(const float* src, const int32_t* rows, int64_t d, float* dst) {
  const int64_t i = blockIdx.x;
  const float* s = src + static_cast<int64_t>(rows[i]) * d;
  for (int64_t c = threadIdx.x; c < d; c += blockDim.x) dst[i * d + c] = s[c];
}

__global__ void ban_tokens_kernel(float* logits, int64_t B, int64_t V, const int32_t* ids,
                                  int64_t n) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= B * n) return;
  logits[(i / n) * V + ids[i % n]] = -INFINITY;
}

template <class T>
__global__ void fill_uniform_kernel(T* dst, int64_t n, uint64_t seed, float lo, float hi) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    uint64_t z = seed + static_cast<uint64_t>(i) * 0x9E3779B97F4A7C15ull;  // cpu::uniform_hash
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    const float u = static_cast<float>(z >> 40) * 0x1p-24f;
    dst[i] = from_f32<T>(lo + (hi - lo) * u);
  }
}

int64_t grid_1d(int64_t n) {
  return std::max<int64_t>(1, std::min<int64_t>(ceil_div(n, 256), 8192));
}

}  // namespace

void lm_qkv_rope(const float* qkv, const float* bias, float clip, QkNormKind norm,
                 const float* q_norm, const float* k_norm, float eps, const int32_t* pos,
                 const float* cos, const float* sin, float q_scale, int64_t B, int64_t Sq,
                 int64_t H, int64_t KV, int64_t hd, void* q, int64_t ldq, void* kv, int64_t ldkv,
                 int64_t kv_bstride, int64_t t0, DType act, cudaStream_t stream) {
  const int64_t cols = (H + 2 * KV) * hd;
  if (cols > kMaxQkvCols) fail("lm_qkv_rope: (H + 2*KV)*head_dim = ", cols, " > ", kMaxQkvCols);
  if (hd % 2 != 0 || hd < 2) fail("lm_qkv_rope: head_dim ", hd, " must be even");
  if (norm != QkNormKind::kNone && (q_norm == nullptr || k_norm == nullptr))
    fail("lm_qkv_rope: a q/k norm needs both weights");
  const int64_t T = B * Sq;
  if (T == 0) return;
  const size_t smem = static_cast<size_t>(cols + 32) * sizeof(float);
  MT_DISPATCH_ACT(
      act, E,
      lm_qkv_rope_kernel<E><<<static_cast<unsigned>(T), kQkvThreads, smem, stream>>>(
          qkv, bias, clip, norm, q_norm, k_norm, eps, pos, cos, sin, q_scale, static_cast<int>(Sq),
          static_cast<int>(H), static_cast<int>(KV), static_cast<int>(hd), static_cast<E*>(q), ldq,
          static_cast<E*>(kv), ldkv, kv_bstride, t0));
  MT_CUDA_CHECK_LAUNCH();
}

void lm_attention(const void* q, int64_t ldq, const void* k, const void* v, int64_t ldkv,
                  int64_t kv_bstride, const int32_t* mask, int64_t mask_ld, int64_t window,
                  int64_t B, int64_t H, int64_t KV, int64_t Sq, int64_t Sk, int64_t hd, void* ctx,
                  int64_t ldctx, DType act, cudaStream_t stream) {
  if (hd > kMaxHd || hd < 1) fail("lm_attention: head_dim ", hd, " outside [1, ", kMaxHd, "]");
  if (Sk > kDecodeMaxKeys) fail("lm_attention: ", Sk, " keys; at most ", kDecodeMaxKeys);
  if (Sq > Sk) fail("lm_attention: ", Sq, " queries over ", Sk, " keys");
  if (KV < 1 || H % KV != 0)
    fail("lm_attention: ", H, " heads not a multiple of ", KV, " kv heads");
  if (B > 65535 || H > 65535) fail("lm_attention: ", B, " sequences x ", H, " heads > 65535");
  if (B == 0 || Sq == 0 || H == 0) return;
  const int threads = hd > 128 ? 256 : 128;
  const int parts = threads / static_cast<int>(hd);
  const size_t smem = static_cast<size_t>(hd + Sk + 32 + parts * hd) * sizeof(float);
  const dim3 grid(static_cast<unsigned>(Sq), static_cast<unsigned>(H), static_cast<unsigned>(B));
  const int win = static_cast<int>(std::min<int64_t>(std::max<int64_t>(window, 0), 1 << 30));
  MT_DISPATCH_ACT(
      act, E,
      lm_attention_kernel<E><<<grid, threads, smem, stream>>>(
          static_cast<const E*>(q), ldq, static_cast<const E*>(k), static_cast<const E*>(v), ldkv,
          kv_bstride, mask, mask_ld, win, static_cast<int>(H / KV), static_cast<int>(Sq),
          static_cast<int>(Sk), static_cast<int>(hd), static_cast<E*>(ctx), ldctx));
  MT_CUDA_CHECK_LAUNCH();
}

void moe_topk(const float* logits, int64_t T, int64_t E, int64_t k, bool renorm, int32_t* expert,
              float* weight, int32_t* counts, cudaStream_t stream) {
  if (E > 32 * kMaxExpertsPerLane || E < 1)
    fail("moe_topk: ", E, " experts outside [1, ", 32 * kMaxExpertsPerLane, "]");
  if (k < 1 || k > std::min<int64_t>(E, kMaxTopK))
    fail("moe_topk: top-k ", k, " outside [1, min(", E, " experts, ", kMaxTopK, ")]");
  if (T == 0) return;
  moe_topk_kernel<<<static_cast<unsigned>(ceil_div(T, kTopkWarps)), kTopkWarps * 32, 0, stream>>>(
      logits, T, static_cast<int>(E), static_cast<int>(k), renorm, expert, weight, counts);
  MT_CUDA_CHECK_LAUNCH();
}

void moe_combine(const float* rows, const float* weight, int64_t T, int64_t k, int64_t d,
                 const float* shared, const float* shared_gate, DType act, float* x,
                 cudaStream_t stream) {
  if (T == 0) return;
  if ((shared == nullptr) != (shared_gate == nullptr))
    fail("moe_combine: the shared expert needs both its output and its gate");
  MT_DISPATCH_ACT(act, E,
                  moe_combine_kernel<E><<<static_cast<unsigned>(T), 256, 0, stream>>>(
                      rows, weight, static_cast<int>(k), d, shared, shared_gate, x));
  MT_CUDA_CHECK_LAUNCH();
}

void swiglu(const float* in, int64_t rows, int64_t F, void* out, DType act, cudaStream_t stream) {
  const int64_t n = rows * F;
  if (n == 0) return;
  MT_DISPATCH_ACT(act, E,
                  swiglu_kernel<E><<<grid_1d(n), 256, 0, stream>>>(in, n, F, static_cast<E*>(out)));
  MT_CUDA_CHECK_LAUNCH();
}

void add_bias(float* x, const float* bias, int64_t rows, int64_t d, cudaStream_t stream) {
  const int64_t n = rows * d;
  if (n == 0) return;
  add_bias_kernel<<<grid_1d(n), 256, 0, stream>>>(x, bias, n, d);
  MT_CUDA_CHECK_LAUNCH();
}

void gather_rows(const float* src, const int32_t* rows, int64_t n, int64_t d, float* dst,
                 cudaStream_t stream) {
  if (n == 0) return;
  gather_rows_kernel<<<static_cast<unsigned>(n), 256, 0, stream>>>(src, rows, d, dst);
  MT_CUDA_CHECK_LAUNCH();
}

void ban_tokens(float* logits, int64_t B, int64_t V, const int32_t* ids, int64_t n_ids,
                cudaStream_t stream) {
  if (B == 0 || n_ids == 0) return;
  ban_tokens_kernel<<<static_cast<unsigned>(ceil_div(B * n_ids, 256)), 256, 0, stream>>>(
      logits, B, V, ids, n_ids);
  MT_CUDA_CHECK_LAUNCH();
}

void fill_uniform(void* dst, int64_t n, DType act, uint64_t seed, float lo, float hi,
                  cudaStream_t stream) {
  if (n == 0) return;
  MT_DISPATCH_ACT(act, E,
                  fill_uniform_kernel<E>
                  <<<grid_1d(n), 256, 0, stream>>>(static_cast<E*>(dst), n, seed, lo, hi));
  MT_CUDA_CHECK_LAUNCH();
}

}  // namespace moetrace::cuda
