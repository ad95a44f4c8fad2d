// The mixture-of-experts layer on the GPU: router (softmax, top-1, per-sequence capacity scan,
// gate), the expert permutation plan, and the grouped expert GEMMs whose epilogues fuse the ReLU
// and the gate-scaled un-permute into the residual add. Nothing here waits for the host: expert
// counts stay on the device and drive a tile table that the GEMM grids read.

#include <algorithm>

#include "kernels/cuda/common.h"
#include "kernels/cuda/device_types.cuh"
#include "kernels/cuda/mma.cuh"
#include "kernels/cuda/ops.h"

namespace moetrace::cuda {
namespace {

constexpr int kRouteThreads = 1024;  // 32 warps: one sequence per block, tokens spread over warps
constexpr int kMaxSeq = 1024;
constexpr int kMaxExpertsPerLane = 8;  // E <= 256

// One block per sequence. Phase 1: one warp per token (softmax, argmax, gate). Phase 2: the
// capacity scan in position order, as a count of earlier same-expert tokens (S² / 2 shared-memory
// compares).
template <class T>
__global__ void __launch_bounds__(kRouteThreads)
    moe_route_kernel(const float* logits, int S, int E, int capacity, int32_t* expert,
                     uint8_t* dropped, float* gate, int32_t* counts, uint16_t* logits_f16) {
  __shared__ int16_t top[kMaxSeq];
  const int b = blockIdx.x;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, n_warps = blockDim.x / 32;
  for (int s = warp; s < S; s += n_warps) {
    const int64_t t = static_cast<int64_t>(b) * S + s;
    const float* l = logits + t * E;
    float v[kMaxExpertsPerLane];
#pragma unroll
    for (int u = 0; u < kMaxExpertsPerLane; ++u) {
      const int e = u * 32 + lane;
      v[u] = e < E ? l[e] : -INFINITY;
      if (logits_f16 && e < E) {
        const __half hv = __float2half_rn(v[u]);
        logits_f16[t * E + e] = *reinterpret_cast<const uint16_t*>(&hv);
      }
    }
    const float sum = warp_softmax_exp(v, E, lane);
    // argmax of the probabilities as T holds them (the activation dtype as in transformers, or
    // float32 for a decision in float32); lowest index wins ties.
    float best = -1.f;
    int best_e = E;
#pragma unroll
    for (int u = 0; u < kMaxExpertsPerLane; ++u) {
      const int e = u * 32 + lane;
      if (e < E) {
        const float p = round_to<T>(v[u] / sum);
        if (p > best) {  // e increases with u: the first max is the lowest index of this lane
          best = p;
          best_e = e;
        }
      }
    }
    warp_argmax(best, best_e);
    if (lane == 0) {
      top[s] = static_cast<int16_t>(best_e);
      expert[t] = best_e;
      gate[t] = best;
    }
  }
  __syncthreads();
  for (int s = threadIdx.x; s < S; s += blockDim.x) {
    const int e = top[s];
    int rank = 0;
    for (int j = 0; j < s; ++j) rank += top[j] == e;
    const bool drop = rank >= capacity;
    dropped[static_cast<int64_t>(b) * S + s] = drop ? 1 : 0;
    if (!drop) atomicAdd(&counts[e], 1);
  }
}

__global__ void moe_plan_kernel(const int32_t* counts, int E, int tile_m, int max_tiles,
                                int32_t* offsets, int32_t* tile_expert, int32_t* tile_row,
                                int32_t* cursor) {
  __shared__ int total_tiles;
  if (threadIdx.x == 0) {
    int off = 0, tiles = 0;
    for (int e = 0; e < E; ++e) {
      offsets[e] = off;
      const int c = counts[e];
      for (int r = 0; r < c; r += tile_m) {
        tile_expert[tiles] = e;
        tile_row[tiles] = off + r;
        ++tiles;
      }
      off += c;
    }
    offsets[E] = off;
    total_tiles = tiles;
  }
  __syncthreads();
  for (int i = total_tiles + threadIdx.x; i < max_tiles; i += blockDim.x) {
    tile_expert[i] = -1;
    tile_row[i] = 0;
  }
  for (int e = threadIdx.x; e < E; e += blockDim.x) cursor[e] = 0;
}

__global__ void moe_permute_kernel(const int32_t* expert, const uint8_t* dropped, int64_t T,
                                   const int32_t* offsets, int32_t* cursor, int32_t* perm) {
  const int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (t >= T || (dropped != nullptr && dropped[t])) return;
  const int e = expert[t];
  perm[offsets[e] + atomicAdd(&cursor[e], 1)] = static_cast<int32_t>(t);
}

// ---- grouped GEMM, tensor cores (bf16 / fp16 in, fp32 accumulate)
// ---------------------------------

constexpr int kBM = kGroupedTileM, kBN = 256, kBK = 64, kStages = 3, kLds = kBK + 8;
constexpr int kThreads = 256;                       // 8 warps as 2 (M) x 4 (N), each 64 x 64
constexpr int kAChunks = kBM * kBK / 8 / kThreads;  // 16-byte copies per thread and stage
constexpr int kBChunks = kBN * kBK / 8 / kThreads;
constexpr size_t kWmmaSmem = static_cast<size_t>(kStages) * (kBM + kBN) * kLds * 2;

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int n = valid ? 16 : 0;  // 0 source bytes: the 16 bytes are zero-filled
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(n));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ float silu(float g) { return g / (1.f + expf(-g)); }

// Applies the epilogue to the float32 accumulator values a0, a1 of permuted row r, columns n and
// n + 1 (n even; has1: column n + 1 exists).
template <class T>
__device__ __forceinline__ void epilogue_pair(GroupedEpilogue ep, float a0, float a1, bool has1,
                                              int r, int n, const int32_t* perm, void* out,
                                              int64_t ldo, const float* gate) {
  switch (ep) {
    case GroupedEpilogue::kRelu: {
      T* o = static_cast<T*>(out) + static_cast<int64_t>(r) * ldo;
      o[n] = from_f32<T>(fmaxf(a0, 0.f));
      if (has1) o[n + 1] = from_f32<T>(fmaxf(a1, 0.f));
      break;
    }
    case GroupedEpilogue::kGateResidual: {
      const int tok = perm[r];
      float* x = static_cast<float*>(out) + static_cast<int64_t>(tok) * ldo;
      x[n] += gate[tok] * a0;
      if (has1) x[n + 1] += gate[tok] * a1;
      break;
    }
    case GroupedEpilogue::kSwiGlu:
      if (has1)
        static_cast<T*>(out)[static_cast<int64_t>(r) * ldo + n / 2] = from_f32<T>(silu(a0) * a1);
      break;
    case GroupedEpilogue::kRows: {
      float* x = static_cast<float*>(out) + static_cast<int64_t>(perm[r]) * ldo;
      x[n] = a0;
      if (has1) x[n + 1] = a1;
      break;
    }
  }
}

// Tensor-core grouped GEMM: mma.sync m16n8k16 fed by ldmatrix from a 3-stage cp.async pipeline.
// Block tile 128 x 256 x 32, 8 warps as 2 (M) x 4 (N), each 64 x 64 = 4 x 8 m16n8 tiles. Fragment
// layouts as in the PTX ISA: accumulator c0,c1 at row g = lane/4, columns 2t, 2t+1 (t = lane%4);
// c2,c3 at row g + 8.
template <class T>
__global__ void __launch_bounds__(kThreads)
    grouped_gemm_wmma_kernel(const T* A, int64_t lda, bool a_gather, int a_div, const int32_t* perm,
                             const T* W, int N, int K, const int32_t* tile_expert,
                             const int32_t* tile_row, const int32_t* offsets, GroupedEpilogue ep,
                             void* out, int64_t ldo, const float* gate) {
  const int e = tile_expert[blockIdx.y];
  if (e < 0) return;
  const int row0 = tile_row[blockIdx.y];
  const int row_end = offsets[e + 1];
  const int n0 = blockIdx.x * kBN;
  extern __shared__ __align__(128) unsigned char smem[];
  T* As = reinterpret_cast<T*>(smem);
  T* Bs = As + kStages * kBM * kLds;
  const T* We = W + static_cast<int64_t>(e) * N * K;
  const int tid = threadIdx.x;

  const T* a_src[kAChunks];
  bool a_ok[kAChunks];
  int a_off[kAChunks];
#pragma unroll
  for (int c = 0; c < kAChunks; ++c) {
    const int chunk = tid + c * kThreads;
    const int r = chunk / (kBK / 8), col = (chunk % (kBK / 8)) * 8;
    a_ok[c] = row0 + r < row_end;
    const int64_t arow = a_ok[c] ? (a_gather ? perm[row0 + r] / a_div : row0 + r) : 0;
    a_src[c] = A + arow * lda + col;
    a_off[c] = r * kLds + col;
  }
  // B rows of this thread: tid / (kBK/8) + c * kBRowStep, all at column b_col0.
  constexpr int kBRowStep = kThreads / (kBK / 8);
  const int b_r0 = tid / (kBK / 8), b_col0 = (tid % (kBK / 8)) * 8;
  const T* b_base = We + static_cast<int64_t>(n0 + b_r0) * K + b_col0;
  const int k_tiles = (K + kBK - 1) / kBK;
  auto load_stage = [&](int stage, int kt) {
    const int k0 = kt * kBK;
#pragma unroll
    for (int c = 0; c < kAChunks; ++c) {
      const bool ok = a_ok[c] && k0 + (a_off[c] % kLds) < K;
      cp_async16(As + stage * kBM * kLds + a_off[c], ok ? a_src[c] + k0 : A, ok);
    }
#pragma unroll
    for (int c = 0; c < kBChunks; ++c) {
      const bool ok = n0 + b_r0 + c * kBRowStep < N && k0 + b_col0 < K;
      cp_async16(Bs + stage * kBN * kLds + (b_r0 + c * kBRowStep) * kLds + b_col0,
                 ok ? b_base + static_cast<int64_t>(c * kBRowStep) * K + k0 : W, ok);
    }
  };

  const int warp = tid / 32, lane = tid % 32;
  const int wm = warp / 4, wn = warp % 4;
  float acc[4][8][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 8; ++j) acc[i][j][0] = acc[i][j][1] = acc[i][j][2] = acc[i][j][3] = 0.f;

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < k_tiles) load_stage(s, s);
    cp_async_commit();
  }
  // ldmatrix row addresses: A x4 -> lanes 0-15 rows 0-15 at k 0, lanes 16-31 rows 0-15 at k 8;
  // B x4 (two n8 tiles) -> lanes 0-7 rows n 0-7 at k 0, 8-15 n 0-7 at k 8, 16-23 n 8-15 at k 0,
  // 24-31 n 8-15 at k 8.
  const int a_row = wm * 64 + (lane % 16), a_col = (lane / 16) * 8;
  const int b_row = wn * 64 + (lane % 8) + (lane / 16) * 8, b_col = ((lane / 8) % 2) * 8;
  for (int kt = 0; kt < k_tiles; ++kt) {
    cp_async_wait<kStages - 2>();
    __syncthreads();
    const int next = kt + kStages - 1;  // refill the stage computed in the previous iteration
    if (next < k_tiles) load_stage(next % kStages, next);
    cp_async_commit();
    const int stage = kt % kStages;
    const T* as = As + stage * kBM * kLds;
    const T* bs = Bs + stage * kBN * kLds;
#pragma unroll
    for (int kk = 0; kk < kBK; kk += 16) {
      uint32_t fa[4][4], fb[4][4];
#pragma unroll
      for (int i = 0; i < 4; ++i) ldmatrix_x4(fa[i], as + (a_row + i * 16) * kLds + kk + a_col);
#pragma unroll
      for (int j = 0; j < 4; ++j) ldmatrix_x4(fb[j], bs + (b_row + j * 16) * kLds + kk + b_col);
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          mma16816<T>(acc[i][2 * j], fa[i], fb[j][0], fb[j][1]);
          mma16816<T>(acc[i][2 * j + 1], fa[i], fb[j][2], fb[j][3]);
        }
    }
  }
  cp_async_wait<0>();
  const int g = lane / 4, t = lane % 4;
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int grow = row0 + wm * 64 + i * 16 + g + half * 8;
      if (grow >= row_end) continue;
      if (ep == GroupedEpilogue::kSwiGlu || ep == GroupedEpilogue::kRows) {
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          const int n = n0 + wn * 64 + j * 8 + t * 2;
          if (n < N)
            epilogue_pair<T>(ep, acc[i][j][half * 2], acc[i][j][half * 2 + 1], n + 1 < N, grow, n,
                             perm, out, ldo, gate);
        }
      } else if (ep == GroupedEpilogue::kRelu) {
        T* o = static_cast<T*>(out) + static_cast<int64_t>(grow) * ldo;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          const int n = n0 + wn * 64 + j * 8 + t * 2;
          const float v0 = fmaxf(acc[i][j][half * 2], 0.f),
                      v1 = fmaxf(acc[i][j][half * 2 + 1], 0.f);
          if (n + 1 < N && ldo % 2 == 0) {
            T pair[2] = {from_f32<T>(v0), from_f32<T>(v1)};
            *reinterpret_cast<uint32_t*>(o + n) = *reinterpret_cast<const uint32_t*>(pair);
          } else if (n < N) {
            o[n] = from_f32<T>(v0);
          }
        }
      } else {
        const int tok = perm[grow];
        const float gt = gate[tok];
        float* x = static_cast<float*>(out) + static_cast<int64_t>(tok) * ldo;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          const int n = n0 + wn * 64 + j * 8 + t * 2;
          if (n + 1 < N && ldo % 2 == 0) {
            float2 v = *reinterpret_cast<float2*>(x + n);
            v.x += gt * acc[i][j][half * 2];
            v.y += gt * acc[i][j][half * 2 + 1];
            *reinterpret_cast<float2*>(x + n) = v;
          } else if (n < N) {
            x[n] += gt * acc[i][j][half * 2];
          }
        }
      }
    }
}

// ---- grouped GEMM, float32 SIMT (parity mode; no TF32) ------------------------------------------

constexpr int kFM = kGroupedTileMF32, kFN = 64, kFK = 16;

__global__ void __launch_bounds__(256)
    grouped_gemm_f32_kernel(const float* A, int64_t lda, bool a_gather, int a_div,
                            const int32_t* perm, const float* W, int N, int K,
                            const int32_t* tile_expert, const int32_t* tile_row,
                            const int32_t* offsets, GroupedEpilogue ep, void* out, int64_t ldo,
                            const float* gate) {
  const int e = tile_expert[blockIdx.y];
  if (e < 0) return;
  const int row0 = tile_row[blockIdx.y];
  const int row_end = offsets[e + 1];
  const int n0 = blockIdx.x * kFN;
  const float* We = W + static_cast<int64_t>(e) * N * K;
  __shared__ float As[kFK][kFM + 4];
  __shared__ float Bs[kFK][kFN + 4];
  const int tid = threadIdx.x;
  const int tr = tid / 16, tc = tid % 16;  // 16 x 16 threads, 4 x 4 outputs each
  float acc[4][4] = {};
  for (int k0 = 0; k0 < K; k0 += kFK) {
    for (int i = tid; i < kFM * kFK; i += 256) {
      const int r = i / kFK, k = i % kFK;
      const int grow = row0 + r;
      float v = 0.f;
      if (grow < row_end && k0 + k < K)
        v = A[static_cast<int64_t>(a_gather ? perm[grow] / a_div : grow) * lda + k0 + k];
      As[k][r] = v;
    }
    for (int i = tid; i < kFN * kFK; i += 256) {
      const int n = i / kFK, k = i % kFK;
      Bs[k][n] = (n0 + n < N && k0 + k < K) ? We[static_cast<int64_t>(n0 + n) * K + k0 + k] : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < kFK; ++k) {
      float a[4], b[4];
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        a[u] = As[k][tr * 4 + u];
        b[u] = Bs[k][tc * 4 + u];
      }
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int grow = row0 + tr * 4 + i;
    if (grow >= row_end) continue;
#pragma unroll
    for (int j = 0; j < 4; j += 2) {
      const int n = n0 + tc * 4 + j;  // even: n0 and tc * 4 are
      if (n < N)
        epilogue_pair<float>(ep, acc[i][j], acc[i][j + 1], n + 1 < N, grow, n, perm, out, ldo,
                             gate);
    }
  }
}

}  // namespace

void moe_route(const float* logits, int64_t B, int64_t S, int64_t E, int64_t capacity,
               DType probs_dt, int32_t* expert, uint8_t* dropped, float* gate, int32_t* counts,
               uint16_t* logits_f16, cudaStream_t stream) {
  if (S > kMaxSeq) fail("moe_route: sequence length ", S, " > ", kMaxSeq);
  if (E > 32 * kMaxExpertsPerLane) fail("moe_route: ", E, " experts > ", 32 * kMaxExpertsPerLane);
  if (B == 0 || S == 0) return;
  const int cap = static_cast<int>(std::min<int64_t>(capacity, 1 << 30));
  MT_DISPATCH_ACT(probs_dt, T,
                  moe_route_kernel<T><<<B, kRouteThreads, 0, stream>>>(
                      logits, static_cast<int>(S), static_cast<int>(E), cap, expert, dropped, gate,
                      counts, logits_f16));
  MT_CUDA_CHECK_LAUNCH();
}

void moe_plan(const int32_t* counts, int64_t E, int tile_m, int64_t max_tiles, int32_t* offsets,
              int32_t* tile_expert, int32_t* tile_row, int32_t* cursor, cudaStream_t stream) {
  moe_plan_kernel<<<1, 256, 0, stream>>>(counts, static_cast<int>(E), tile_m,
                                         static_cast<int>(max_tiles), offsets, tile_expert,
                                         tile_row, cursor);
  MT_CUDA_CHECK_LAUNCH();
}

void moe_permute(const int32_t* expert, const uint8_t* dropped, int64_t T, const int32_t* offsets,
                 int32_t* cursor, int32_t* perm, cudaStream_t stream) {
  if (T == 0) return;
  moe_permute_kernel<<<ceil_div(T, 256), 256, 0, stream>>>(expert, dropped, T, offsets, cursor,
                                                           perm);
  MT_CUDA_CHECK_LAUNCH();
}

int grouped_tile_m(DType act) { return act == DType::kF32 ? kGroupedTileMF32 : kGroupedTileM; }

void grouped_gemm(const void* A, int64_t lda, bool a_gather, const int32_t* perm, const void* W,
                  int64_t N, int64_t K, const int32_t* tile_expert, const int32_t* tile_row,
                  const int32_t* offsets, int64_t max_tiles, GroupedEpilogue epilogue, void* out,
                  int64_t ldo, const float* gate, DType act, cudaStream_t stream, int64_t a_div) {
  if (K % 8 != 0) fail("grouped_gemm: K = ", K, " must be a multiple of 8");
  if (a_div < 1) fail("grouped_gemm: a_div = ", a_div, " must be >= 1");
  if (epilogue == GroupedEpilogue::kSwiGlu && N % 2 != 0)
    fail("grouped_gemm: the SwiGLU epilogue needs an even N (gate and up interleaved), got ", N);
  const int div = static_cast<int>(a_div);
  if (max_tiles == 0 || N == 0) return;
  if (act == DType::kF32) {
    const dim3 grid(static_cast<unsigned>(ceil_div(N, kFN)), static_cast<unsigned>(max_tiles));
    grouped_gemm_f32_kernel<<<grid, 256, 0, stream>>>(
        static_cast<const float*>(A), lda, a_gather, div, perm, static_cast<const float*>(W),
        static_cast<int>(N), static_cast<int>(K), tile_expert, tile_row, offsets, epilogue, out,
        ldo, gate);
    MT_CUDA_CHECK_LAUNCH();
    return;
  }
  const dim3 grid(static_cast<unsigned>(ceil_div(N, kBN)), static_cast<unsigned>(max_tiles));
  auto launch = [&](auto* kernel, const auto* a, const auto* w) {
    static bool attr_set = false;  // per instantiation; the attribute is per function and device
    if (!attr_set) {
      MT_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(kWmmaSmem)));
      attr_set = true;
    }
    kernel<<<grid, kThreads, kWmmaSmem, stream>>>(
        a, lda, a_gather, div, perm, w, static_cast<int>(N), static_cast<int>(K), tile_expert,
        tile_row, offsets, epilogue, out, ldo, gate);
  };
  if (act == DType::kBF16) {
    launch(grouped_gemm_wmma_kernel<__nv_bfloat16>, static_cast<const __nv_bfloat16*>(A),
           static_cast<const __nv_bfloat16*>(W));
  } else if (act == DType::kF16) {
    launch(grouped_gemm_wmma_kernel<__half>, static_cast<const __half*>(A),
           static_cast<const __half*>(W));
  } else {
    fail("grouped_gemm: unsupported dtype ", dtype_name(act));
  }
  MT_CUDA_CHECK_LAUNCH();
}

}  // namespace moetrace::cuda
