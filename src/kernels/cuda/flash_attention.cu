// Fused self-attention for head size 64 on the tensor cores (mma.sync m16n8k16, bf16/fp16 operands,
// fp32 accumulation and softmax): scores, relative position bias, padding mask, online softmax and
// probs·v in one pass, without the [B,H,S,S] scores in device memory (flash-attention style).
// With pairs (--precision faithful), the probabilities enter P·V as hi + lo of the operand dtype
// (two MMAs over the same V) and the output is written as its hi and lo halves.
#include <cstdint>

#include "kernels/cuda/common.h"
#include "kernels/cuda/device_types.cuh"
#include "kernels/cuda/mma.cuh"
#include "kernels/cuda/ops.h"

namespace moetrace::cuda {
namespace {

constexpr int kD = 64, kBQ = 64, kBK = 64, kLds = kD + 8, kMaxS = 1024;

template <class T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  T l = from_f32<T>(lo), h = from_f32<T>(hi);
  return static_cast<uint32_t>(*reinterpret_cast<uint16_t*>(&l)) |
         (static_cast<uint32_t>(*reinterpret_cast<uint16_t*>(&h)) << 16);
}
template <class T>
__device__ __forceinline__ uint32_t pack2(T lo, T hi) {
  return static_cast<uint32_t>(*reinterpret_cast<uint16_t*>(&lo)) |
         (static_cast<uint32_t>(*reinterpret_cast<uint16_t*>(&hi)) << 16);
}
__device__ __forceinline__ uint32_t ld32(const void* p) { return *static_cast<const uint32_t*>(p); }
// The low halves of two pairs, packed as pack2 packs (a in the low 16 bits): what rounding each
// value to T left over, rounded to T.
template <class T>
__device__ __forceinline__ uint32_t pack2_lo(float a, float b) {
  return pack2<T>(a - round_to<T>(a), b - round_to<T>(b));
}
// The A fragment of P·V for the 16 keys kk·16 … kk·16+15 from the probabilities s: their values
// rounded to T, or (kLo) the low halves of their pairs.
template <class T, bool kLo>
__device__ __forceinline__ void probs_fragment(const float (&s)[8][4], int kk, uint32_t (&a)[4]) {
  auto pack = [](float x, float y) { return kLo ? pack2_lo<T>(x, y) : pack2<T>(x, y); };
  a[0] = pack(s[2 * kk][0], s[2 * kk][1]);
  a[1] = pack(s[2 * kk][2], s[2 * kk][3]);
  a[2] = pack(s[2 * kk + 1][0], s[2 * kk + 1][1]);
  a[3] = pack(s[2 * kk + 1][2], s[2 * kk + 1][3]);
}

// Grid (ceil(S/64), H, B), 4 warps; warp w owns query rows [64*x + 16*w, +16). Fragment layouts
// are those of the PTX ISA for m16n8k16: g = lane/4 picks the row (and row + 8), t = lane%4 the
// column pair. kPairs: P·V over the probabilities' hi and lo halves; ctx rows of 2·inner, the hi
// half in columns [0, inner), the lo half in [inner, 2·inner).
template <class T, bool kPairs>
__global__ void __launch_bounds__(128)
    flash_attention_kernel(const T* qkv, int64_t ld, int64_t inner, const float* bias,
                           const int32_t* mask, int S, T* ctx) {
  __shared__ __align__(16) T Ks[kBK][kLds];
  __shared__ __align__(16) T Vs[kBK][kLds];
  __shared__ float bias_s[2 * kMaxS - 1];
  __shared__ float madd_s[kBK];
  const int h = blockIdx.y, b = blockIdx.z;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
  const T* base = qkv + static_cast<int64_t>(b) * S * ld;
  if (bias)
    for (int i = tid; i < 2 * S - 1; i += blockDim.x)
      bias_s[i] = bias[static_cast<int64_t>(h) * (2 * S - 1) + i];

  const int r0 = blockIdx.x * kBQ + warp * 16 + g, r1 = r0 + 8;
  uint32_t qa[4][4];
#pragma unroll
  for (int ks = 0; ks < 4; ++ks) {
    const int c = h * kD + ks * 16 + t * 2;
    qa[ks][0] = r0 < S ? ld32(base + static_cast<int64_t>(r0) * ld + c) : 0u;
    qa[ks][1] = r1 < S ? ld32(base + static_cast<int64_t>(r1) * ld + c) : 0u;
    qa[ks][2] = r0 < S ? ld32(base + static_cast<int64_t>(r0) * ld + c + 8) : 0u;
    qa[ks][3] = r1 < S ? ld32(base + static_cast<int64_t>(r1) * ld + c + 8) : 0u;
  }
  float o[8][4];
#pragma unroll
  for (int nt = 0; nt < 8; ++nt) o[nt][0] = o[nt][1] = o[nt][2] = o[nt][3] = 0.f;
  float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.f, l1 = 0.f;
  // Bias index of key j for a row: j - row + S - 1 (rows past S read row S-1's; they are not
  // written).
  const int b0i = S - 1 - min(r0, S - 1), b1i = S - 1 - min(r1, S - 1);

  for (int k0 = 0; k0 < S; k0 += kBK) {
    __syncthreads();
    for (int c = tid; c < kBK * 8; c += blockDim.x) {
      const int r = c / 8, col = (c % 8) * 8, key = k0 + r;
      uint4 kv = make_uint4(0, 0, 0, 0), vv = make_uint4(0, 0, 0, 0);
      if (key < S) {
        const T* row = base + static_cast<int64_t>(key) * ld + h * kD + col;
        kv = *reinterpret_cast<const uint4*>(row + inner);
        vv = *reinterpret_cast<const uint4*>(row + 2 * inner);
      }
      *reinterpret_cast<uint4*>(&Ks[r][col]) = kv;
      *reinterpret_cast<uint4*>(&Vs[r][col]) = vv;
    }
    for (int c = tid; c < kBK; c += blockDim.x) {
      const int key = k0 + c;
      // Keys past the end do not exist (-inf); masked keys get HF's finite lowest().
      madd_s[c] = key >= S
                      ? -INFINITY
                      : (mask && mask[static_cast<int64_t>(b) * S + key] == 0 ? -FLT_MAX : 0.f);
    }
    __syncthreads();

    float s[8][4];
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
      s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
#pragma unroll
      for (int ks = 0; ks < 4; ++ks) {
        const uint32_t kb0 = ld32(&Ks[nt * 8 + g][ks * 16 + t * 2]);
        const uint32_t kb1 = ld32(&Ks[nt * 8 + g][ks * 16 + 8 + t * 2]);
        mma16816<T>(s[nt], qa[ks], kb0, kb1);
      }
    }
    float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
    for (int nt = 0; nt < 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int jj = nt * 8 + t * 2 + (e & 1);
        const int j = k0 + jj;
        float v = s[nt][e];
        if (bias && j < S) v += bias_s[j + (e < 2 ? b0i : b1i)];
        v += madd_s[jj];
        s[nt][e] = v;
        if (e < 2)
          mx0 = fmaxf(mx0, v);
        else
          mx1 = fmaxf(mx1, v);
      }
    mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
    mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
    mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
    mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
    const float n0 = fmaxf(m0, mx0), n1 = fmaxf(m1, mx1);  // finite: key k0 = 0 always exists
    const float sc0 = expf(m0 - n0), sc1 = expf(m1 - n1);
    m0 = n0;
    m1 = n1;
    l0 *= sc0;
    l1 *= sc1;
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
      o[nt][0] *= sc0;
      o[nt][1] *= sc0;
      o[nt][2] *= sc1;
      o[nt][3] *= sc1;
      s[nt][0] = expf(s[nt][0] - n0);
      s[nt][1] = expf(s[nt][1] - n0);
      s[nt][2] = expf(s[nt][2] - n1);
      s[nt][3] = expf(s[nt][3] - n1);
      l0 += s[nt][0] + s[nt][1];
      l1 += s[nt][2] + s[nt][3];
    }
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      uint32_t pa[4], pl[4];
      probs_fragment<T, false>(s, kk, pa);
      if constexpr (kPairs) probs_fragment<T, true>(s, kk, pl);
#pragma unroll
      for (int nt = 0; nt < 8; ++nt) {
        const int kr = kk * 16 + t * 2, n = nt * 8 + g;
        const uint32_t vb0 = pack2<T>(Vs[kr][n], Vs[kr + 1][n]);
        const uint32_t vb1 = pack2<T>(Vs[kr + 8][n], Vs[kr + 9][n]);
        mma16816<T>(o[nt], pa, vb0, vb1);
        if constexpr (kPairs) mma16816<T>(o[nt], pl, vb0, vb1);
      }
    }
  }
  l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
  l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
  l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
  l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
  const float inv0 = 1.f / l0, inv1 = 1.f / l1;
  const int64_t ldc = kPairs ? 2 * inner : inner;
#pragma unroll
  for (int nt = 0; nt < 8; ++nt) {
    const int col = h * kD + nt * 8 + t * 2;
    const float a0 = o[nt][0] * inv0, a1 = o[nt][1] * inv0, c0 = o[nt][2] * inv1,
                c1 = o[nt][3] * inv1;
    T* row0 = ctx + (static_cast<int64_t>(b) * S + r0) * ldc + col;
    T* row1 = ctx + (static_cast<int64_t>(b) * S + r1) * ldc + col;
    if (r0 < S) {
      *reinterpret_cast<uint32_t*>(row0) = pack2<T>(a0, a1);
      if constexpr (kPairs) *reinterpret_cast<uint32_t*>(row0 + inner) = pack2_lo<T>(a0, a1);
    }
    if (r1 < S) {
      *reinterpret_cast<uint32_t*>(row1) = pack2<T>(c0, c1);
      if constexpr (kPairs) *reinterpret_cast<uint32_t*>(row1 + inner) = pack2_lo<T>(c0, c1);
    }
  }
}

template <class T>
void launch(dim3 grid, const void* qkv, int64_t inner, const float* bias, const int32_t* mask,
            int64_t S, void* ctx, bool pairs, cudaStream_t stream) {
  auto* kernel = pairs ? flash_attention_kernel<T, true> : flash_attention_kernel<T, false>;
  kernel<<<grid, 128, 0, stream>>>(static_cast<const T*>(qkv), 3 * inner, inner, bias, mask,
                                   static_cast<int>(S), static_cast<T*>(ctx));
}

}  // namespace

bool flash_attention_supported(int64_t dk, int64_t S, DType act) {
  return dk == kD && S <= kMaxS && (act == DType::kBF16 || act == DType::kF16);
}

void flash_attention(const void* qkv, const float* bias, const int32_t* mask, int64_t B, int64_t S,
                     int64_t H, int64_t dk, void* ctx, DType act, cudaStream_t stream, bool pairs) {
  if (!flash_attention_supported(dk, S, act))
    fail("flash_attention: needs d_kv 64, S <= ", kMaxS, " and BF16/F16 (got d_kv ", dk, ", S ", S,
         ", ", dtype_name(act), ")");
  if (B == 0 || S == 0) return;
  const dim3 grid(static_cast<unsigned>(ceil_div(S, kBQ)), static_cast<unsigned>(H),
                  static_cast<unsigned>(B));
  const int64_t inner = H * dk;
  if (act == DType::kBF16)
    launch<__nv_bfloat16>(grid, qkv, inner, bias, mask, S, ctx, pairs, stream);
  else
    launch<__half>(grid, qkv, inner, bias, mask, S, ctx, pairs, stream);
  MT_CUDA_CHECK_LAUNCH();
}

}  // namespace moetrace::cuda
