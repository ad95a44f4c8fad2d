// Device-side helpers shared by the .cu files: activation element types and float conversions.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cfloat>
#include <cstdint>

#include "core/dtype.h"
#include "core/error.h"

namespace moetrace::cuda {

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }

template <class T>
__device__ __forceinline__ T from_f32(float v);
template <>
__device__ __forceinline__ float from_f32<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <>
__device__ __forceinline__ __half from_f32<__half>(float v) {
  return __float2half_rn(v);
}

// Rounds a float32 to the activation type and back (what torch's .to(dtype) does to a value).
template <class T>
__device__ __forceinline__ float round_to(float v) {
  return to_f32(from_f32<T>(v));
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Block-wide max / sum through `red` [32] (all threads get the result).
__device__ __forceinline__ float block_max(float v, float* red) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, n_warps = blockDim.x / 32;
  v = warp_max(v);
  __syncthreads();  // red may still be read by a previous reduction
  if (lane == 0) red[warp] = v;
  __syncthreads();
  float r = lane < n_warps ? red[lane] : -INFINITY;
  return warp_max(r);
}
__device__ __forceinline__ float block_sum(float v, float* red) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, n_warps = blockDim.x / 32;
  v = warp_sum(v);
  __syncthreads();
  if (lane == 0) red[warp] = v;
  __syncthreads();
  float r = lane < n_warps ? red[lane] : 0.f;
  return warp_sum(r);
}

// The router rows of the MoE kernels (moe.cu, lm.cu): one warp holds a row of E <= 32·N logits,
// lane l the experts u·32 + l (-inf past E). Replaces them by exp(v - max) and returns the warp's
// sum of those (every lane), so that v[u] / sum is the float32 softmax.
template <int N>
__device__ __forceinline__ float warp_softmax_exp(float (&v)[N], int E, int lane) {
  float mx = -INFINITY;
#pragma unroll
  for (int u = 0; u < N; ++u) mx = fmaxf(mx, v[u]);
  mx = warp_max(mx);
  float sum = 0.f;
#pragma unroll
  for (int u = 0; u < N; ++u) {
    if (u * 32 + lane < E) {
      v[u] = expf(v[u] - mx);
      sum += v[u];
    }
  }
  return warp_sum(sum);
}

// The warp's largest value and its index, the lowest index among equal values (torch's and
// std::max_element's choice), in every lane.
template <class I>
__device__ __forceinline__ void warp_argmax(float& v, I& i) {
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, v, o);
    const I oi = __shfl_xor_sync(0xffffffffu, i, o);
    if (ov > v || (ov == v && oi < i)) {
      v = ov;
      i = oi;
    }
  }
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace moetrace::cuda

// Calls F<T>(args...) with T the device type of `dt` (float, __nv_bfloat16, __half).
#define MT_DISPATCH_ACT(dt, T, ...)                                                        \
  do {                                                                                     \
    switch (dt) {                                                                          \
      case ::moetrace::DType::kF32: {                                                      \
        using T = float;                                                                   \
        __VA_ARGS__;                                                                       \
        break;                                                                             \
      }                                                                                    \
      case ::moetrace::DType::kBF16: {                                                     \
        using T = __nv_bfloat16;                                                           \
        __VA_ARGS__;                                                                       \
        break;                                                                             \
      }                                                                                    \
      case ::moetrace::DType::kF16: {                                                      \
        using T = __half;                                                                  \
        __VA_ARGS__;                                                                       \
        break;                                                                             \
      }                                                                                    \
      default:                                                                             \
        ::moetrace::fail("unsupported GPU activation dtype ", ::moetrace::dtype_name(dt)); \
    }                                                                                      \
  } while (0)
