// Attention softmax with the relative position bias and padding mask fused in, and the pointer
// tables of the per-(batch, head) GEMMs around it.
#include <algorithm>

#include "kernels/cuda/common.h"
#include "kernels/cuda/device_types.cuh"
#include "kernels/cuda/ops.h"

namespace moetrace::cuda {
namespace {

constexpr int kMaxKeysPerLane = 32;  // Sk <= 1024

// One warp per (b, h, i) row; the row lives in registers.
template <class T>
__global__ void attention_softmax_kernel(const float* scores, const float* bias,
                                         const int32_t* mask, bool causal, int64_t B, int64_t H,
                                         int64_t Sq, int64_t Sk, T* probs) {
  const int64_t row = blockIdx.x * static_cast<int64_t>(blockDim.x / 32) + threadIdx.x / 32;
  if (row >= B * H * Sq) return;
  const int lane = threadIdx.x % 32;
  const int64_t i = row % Sq;
  const int64_t h = (row / Sq) % H;
  const int64_t b = row / (Sq * H);
  const float* s = scores + row * Sk;
  const float* bias_h = bias ? bias + h * (2 * Sk - 1) + (Sk - 1) - i : nullptr;  // index by j
  const int32_t* mask_b = mask ? mask + b * Sk : nullptr;
  float v[kMaxKeysPerLane];
  float mx = -INFINITY;
#pragma unroll
  for (int u = 0; u < kMaxKeysPerLane; ++u) {
    const int64_t j = u * 32 + lane;
    v[u] = -INFINITY;
    if (j < Sk) {
      float x = s[j];
      if (bias_h) x += bias_h[j];
      // HF adds (1 - mask) * lowest(float32); a masked key gets a huge negative but finite score.
      if (mask_b && mask_b[j] == 0) x += -FLT_MAX;
      if (causal && j > i) x += -FLT_MAX;
      v[u] = x;
      mx = fmaxf(mx, x);
    }
  }
  mx = warp_max(mx);
  float sum = 0.f;
#pragma unroll
  for (int u = 0; u < kMaxKeysPerLane; ++u) {
    const int64_t j = u * 32 + lane;
    if (j < Sk) {
      v[u] = expf(v[u] - mx);
      sum += v[u];
    }
  }
  sum = warp_sum(sum);
  const float inv = 1.f / sum;
  T* p = probs + row * Sk;
#pragma unroll
  for (int u = 0; u < kMaxKeysPerLane; ++u) {
    const int64_t j = u * 32 + lane;
    if (j < Sk) p[j] = from_f32<T>(v[u] * inv);
  }
}

template <class T>
__global__ void attention_pointers_kernel(const T* qkv, const float* scores, const T* probs, T* ctx,
                                          int64_t B, int64_t S, int64_t H, int64_t dk,
                                          AttentionPointers p) {
  const int64_t n = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (n >= B * H) return;
  const int64_t b = n / H, h = n % H;
  const int64_t ld = 3 * H * dk;
  const T* base = qkv + b * S * ld + h * dk;
  p.q[n] = base;
  p.k[n] = base + H * dk;
  p.v[n] = base + 2 * H * dk;
  p.scores[n] = const_cast<float*>(scores) + n * S * S;
  p.probs[n] = probs + n * S * S;
  p.ctx[n] = ctx + b * S * H * dk + h * dk;
}

}  // namespace

void attention_softmax(const float* scores, const float* bias, const int32_t* mask, bool causal,
                       int64_t B, int64_t H, int64_t Sq, int64_t Sk, void* probs, DType act,
                       cudaStream_t stream) {
  if (Sk > 32 * kMaxKeysPerLane)
    fail("attention_softmax: ", Sk, " keys; at most ", 32 * kMaxKeysPerLane);
  const int64_t rows = B * H * Sq;
  if (rows == 0) return;
  constexpr int kWarps = 8;
  MT_DISPATCH_ACT(act, T,
                  attention_softmax_kernel<T><<<ceil_div(rows, kWarps), kWarps * 32, 0, stream>>>(
                      scores, bias, mask, causal, B, H, Sq, Sk, static_cast<T*>(probs)));
  MT_CUDA_CHECK_LAUNCH();
}

void attention_pointers(const void* qkv, const float* scores, const void* probs, void* ctx,
                        int64_t B, int64_t S, int64_t H, int64_t dk, DType act, AttentionPointers p,
                        cudaStream_t stream) {
  const int64_t n = B * H;
  if (n == 0) return;
  MT_DISPATCH_ACT(act, T,
                  attention_pointers_kernel<T><<<ceil_div(n, 256), 256, 0, stream>>>(
                      static_cast<const T*>(qkv), scores, static_cast<const T*>(probs),
                      static_cast<T*>(ctx), B, S, H, dk, p));
  MT_CUDA_CHECK_LAUNCH();
}

}  // namespace moetrace::cuda
