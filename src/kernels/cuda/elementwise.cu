// Embedding gather, RMS norm and conversions.
#include "kernels/cuda/common.h"
#include "kernels/cuda/device_types.cuh"
#include "kernels/cuda/ops.h"

namespace moetrace::cuda {
namespace {

template <class T>
__global__ void embed_kernel(const int32_t* ids, const T* table, int64_t d, float* x) {
  const int64_t t = blockIdx.x;
  const T* row = table + static_cast<int64_t>(ids[t]) * d;
  float* out = x + t * d;
  for (int64_t c = threadIdx.x; c < d; c += blockDim.x) out[c] = to_f32(row[c]);
}

// One warp per row, the row in registers (d <= 32 * 4 * kMaxVec); float32 sum of squares.
constexpr int kMaxVec = 8;  // d <= 1024
template <class T>
__global__ void rmsnorm_kernel(const float* x, const float* w, int64_t rows, int d, float eps,
                               T* out, float* out_f32) {
  const int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x / 32) + threadIdx.x / 32;
  if (r >= rows) return;
  const int lane = threadIdx.x % 32;
  const float4* xr = reinterpret_cast<const float4*>(x + r * d);
  const int n4 = d / 4;
  float4 v[kMaxVec];
  float ss = 0.f;
#pragma unroll
  for (int u = 0; u < kMaxVec; ++u) {
    const int i = u * 32 + lane;
    if (i < n4) {
      v[u] = xr[i];
      ss += v[u].x * v[u].x + v[u].y * v[u].y + v[u].z * v[u].z + v[u].w * v[u].w;
    }
  }
  ss = warp_sum(ss);
  const float scale = rsqrtf(ss / static_cast<float>(d) + eps);
  const float4* w4 = reinterpret_cast<const float4*>(w);
#pragma unroll
  for (int u = 0; u < kMaxVec; ++u) {
    const int i = u * 32 + lane;
    if (i < n4) {
      const float4 ww = w4[i];
      const float4 y = make_float4(ww.x * (v[u].x * scale), ww.y * (v[u].y * scale),
                                   ww.z * (v[u].z * scale), ww.w * (v[u].w * scale));
      T* o = out + r * d + i * 4;
      o[0] = from_f32<T>(y.x);
      o[1] = from_f32<T>(y.y);
      o[2] = from_f32<T>(y.z);
      o[3] = from_f32<T>(y.w);
      if (out_f32) reinterpret_cast<float4*>(out_f32 + r * d)[i] = y;
    }
  }
}

// Any d: one block per row.
template <class T>
__global__ void rmsnorm_any_kernel(const float* x, const float* w, int64_t d, float eps, T* out,
                                   float* out_f32) {
  const int64_t r = blockIdx.x;
  const float* xr = x + r * d;
  float ss = 0.f;
  for (int64_t c = threadIdx.x; c < d; c += blockDim.x) ss += xr[c] * xr[c];
  __shared__ float partial[32];
  ss = warp_sum(ss);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) partial[warp] = ss;
  __syncthreads();
  if (warp == 0) {
    float v = lane < static_cast<int>(blockDim.x / 32) ? partial[lane] : 0.f;
    v = warp_sum(v);
    if (lane == 0) partial[0] = v;
  }
  __syncthreads();
  const float scale = rsqrtf(partial[0] / static_cast<float>(d) + eps);
  for (int64_t c = threadIdx.x; c < d; c += blockDim.x) {
    const float v = w[c] * (xr[c] * scale);
    out[r * d + c] = from_f32<T>(v);
    if (out_f32) out_f32[r * d + c] = v;
  }
}

template <class T>
__global__ void convert_kernel(const float* src, int64_t n, T* dst) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    dst[i] = from_f32<T>(src[i]);
}

}  // namespace

void embed(const int32_t* ids, const void* table, DType table_dt, int64_t T, int64_t d, float* x,
           cudaStream_t stream) {
  if (T == 0) return;
  MT_DISPATCH_ACT(table_dt, E,
                  embed_kernel<E><<<T, 256, 0, stream>>>(ids, static_cast<const E*>(table), d, x));
  MT_CUDA_CHECK_LAUNCH();
}

void rmsnorm(const float* x, const float* w, int64_t rows, int64_t d, float eps, void* out,
             DType act, float* out_f32, cudaStream_t stream) {
  if (rows == 0) return;
  if (d % 4 == 0 && d <= 32 * 4 * kMaxVec) {
    constexpr int kWarps = 8;
    MT_DISPATCH_ACT(act, T,
                    rmsnorm_kernel<T><<<ceil_div(rows, kWarps), kWarps * 32, 0, stream>>>(
                        x, w, rows, static_cast<int>(d), eps, static_cast<T*>(out), out_f32));
  } else {
    MT_DISPATCH_ACT(act, T,
                    rmsnorm_any_kernel<T>
                    <<<rows, 256, 0, stream>>>(x, w, d, eps, static_cast<T*>(out), out_f32));
  }
  MT_CUDA_CHECK_LAUNCH();
}

void convert_f32(const float* src, int64_t n, void* dst, DType dst_dt, cudaStream_t stream) {
  if (n == 0) return;
  const int64_t blocks = std::min<int64_t>(ceil_div(n, 256), 4096);
  MT_DISPATCH_ACT(dst_dt, T,
                  convert_kernel<T><<<blocks, 256, 0, stream>>>(src, n, static_cast<T*>(dst)));
  MT_CUDA_CHECK_LAUNCH();
}

}  // namespace moetrace::cuda
