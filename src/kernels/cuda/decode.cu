// The decoder's attention over a key/value cache (one block per query row: generation steps see one
// query per sequence, so the [B,H,Sq,Sk] tensors of the encoder's batched path would be mostly
// empty) and the greedy pick of the next token.
#include <algorithm>

#include "kernels/cuda/common.h"
#include "kernels/cuda/device_types.cuh"
#include "kernels/cuda/ops.h"

namespace moetrace::cuda {
namespace {

constexpr int kAttnThreads = 128;  // 4 warps
constexpr int kMaxDk = kAttnThreads;
constexpr int kPickThreads = 1024;

// Grid (Sq, H, B). Shared memory: q [dk] | scores [Sk] | red [32] | partial sums [parts * dk].
template <class T>
__global__ void __launch_bounds__(kAttnThreads)
    decode_attention_kernel(const T* q, int64_t ldq, const T* k, const T* v, int64_t ldkv,
                            int64_t kv_bstride, const float* bias_dist, int64_t bias_ld,
                            const int32_t* mask, bool causal, int Sq, int Sk, int dk, T* ctx,
                            int64_t ldctx) {
  extern __shared__ float sm[];
  float* qs = sm;
  float* sc = qs + dk;
  float* red = sc + Sk;
  float* part = red + 32;
  const int i = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32, n_warps = blockDim.x / 32;
  const T* qrow = q + (static_cast<int64_t>(b) * Sq + i) * ldq + static_cast<int64_t>(h) * dk;
  for (int c = tid; c < dk; c += blockDim.x) qs[c] = to_f32(qrow[c]);
  __syncthreads();
  const int pos = i + Sk - Sq;  // the query's position among the keys
  const int n_keys = causal ? pos + 1 : Sk;
  const T* kb = k + static_cast<int64_t>(b) * kv_bstride + static_cast<int64_t>(h) * dk;
  const T* vb = v + static_cast<int64_t>(b) * kv_bstride + static_cast<int64_t>(h) * dk;
  // Scores, unscaled (T5): one warp per key, lanes over the head dimension.
  for (int j = warp; j < n_keys; j += n_warps) {
    const T* kr = kb + static_cast<int64_t>(j) * ldkv;
    float acc = 0.f;
    for (int c = lane; c < dk; c += 32) acc += qs[c] * to_f32(kr[c]);
    acc = warp_sum(acc);
    if (lane == 0) {
      if (bias_dist) acc += bias_dist[static_cast<int64_t>(h) * bias_ld + (pos - j)];
      // HF adds (1 - mask) * lowest(float32): a masked key gets a huge negative but finite score.
      if (mask && mask[static_cast<int64_t>(b) * Sk + j] == 0) acc += -FLT_MAX;
      sc[j] = acc;
    }
  }
  __syncthreads();
  float mx = -INFINITY;
  for (int j = tid; j < n_keys; j += blockDim.x) mx = fmaxf(mx, sc[j]);
  mx = block_max(mx, red);
  float sum = 0.f;
  for (int j = tid; j < n_keys; j += blockDim.x) {
    const float e = expf(sc[j] - mx);
    sc[j] = e;
    sum += e;
  }
  sum = block_sum(sum, red);
  const float inv = 1.f / sum;
  // Probabilities rounded to the activation dtype for probs·v (transformers' .type_as(scores)).
  for (int j = tid; j < n_keys; j += blockDim.x) sc[j] = round_to<T>(sc[j] * inv);
  __syncthreads();
  // ctx: threads as `parts` groups of dk columns, each group summing every parts-th key.
  const int parts = blockDim.x / dk;
  if (tid < parts * dk) {
    const int c = tid % dk, p = tid / dk;
    float acc = 0.f;
    for (int j = p; j < n_keys; j += parts)
      acc += sc[j] * to_f32(vb[static_cast<int64_t>(j) * ldkv + c]);
    part[p * dk + c] = acc;
  }
  __syncthreads();
  if (tid < dk) {
    float acc = 0.f;
    for (int p = 0; p < parts; ++p) acc += part[p * dk + tid];
    ctx[(static_cast<int64_t>(b) * Sq + i) * ldctx + static_cast<int64_t>(h) * dk + tid] =
        from_f32<T>(acc);
  }
}

// One block per sequence: first maximum of the row (std::max_element's choice), then the finished
// bookkeeping of SwitchModel::generate.
__global__ void __launch_bounds__(kPickThreads)
    greedy_pick_kernel(const float* logits, int64_t V, int32_t banned, int32_t eos, int32_t pad,
                       uint8_t* finished, int32_t* ids) {
  __shared__ float best_v[32];
  __shared__ int64_t best_i[32];
  const int b = blockIdx.x;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32, n_warps = blockDim.x / 32;
  const float* row = logits + static_cast<int64_t>(b) * V;
  float bv = -INFINITY;
  int64_t bi = V;  // none yet
  for (int64_t j = tid; j < V; j += blockDim.x) {
    const float x = j == banned ? -INFINITY : row[j];
    if (x > bv || (bi == V && x == bv)) {  // ascending j: the first maximum of this thread
      bv = x;
      bi = j;
    }
  }
  warp_argmax(bv, bi);
  if (lane == 0) {
    best_v[warp] = bv;
    best_i[warp] = bi;
  }
  __syncthreads();
  if (warp == 0) {
    bv = lane < n_warps ? best_v[lane] : -INFINITY;
    bi = lane < n_warps ? best_i[lane] : V;
    warp_argmax(bv, bi);
    if (lane == 0) {
      int32_t next = bi < V ? static_cast<int32_t>(bi) : 0;  // an all-NaN row: the first token
      if (finished[b]) next = pad;
      if (next == eos) finished[b] = 1;
      ids[b] = next;
    }
  }
}

}  // namespace

void decode_attention(const void* q, int64_t ldq, const void* k, const void* v, int64_t ldkv,
                      int64_t kv_bstride, const float* bias_dist, int64_t bias_ld,
                      const int32_t* mask, bool causal, int64_t B, int64_t H, int64_t Sq,
                      int64_t Sk, int64_t dk, void* ctx, int64_t ldctx, DType act,
                      cudaStream_t stream) {
  if (dk > kMaxDk || dk < 1) fail("decode_attention: head size ", dk, " outside [1, ", kMaxDk, "]");
  if (Sk > kDecodeMaxKeys) fail("decode_attention: ", Sk, " keys; at most ", kDecodeMaxKeys);
  if (Sq > Sk) fail("decode_attention: ", Sq, " queries over ", Sk, " keys");
  if (B > 65535 || H > 65535) fail("decode_attention: ", B, " sequences x ", H, " heads > 65535");
  if (bias_dist && !causal) fail("decode_attention: a distance bias needs causal attention");
  if (B == 0 || Sq == 0 || H == 0) return;
  const int parts = kAttnThreads / static_cast<int>(dk);
  const size_t smem = static_cast<size_t>(dk + Sk + 32 + parts * dk) * sizeof(float);
  const dim3 grid(static_cast<unsigned>(Sq), static_cast<unsigned>(H), static_cast<unsigned>(B));
  MT_DISPATCH_ACT(
      act, T,
      decode_attention_kernel<T><<<grid, kAttnThreads, smem, stream>>>(
          static_cast<const T*>(q), ldq, static_cast<const T*>(k), static_cast<const T*>(v), ldkv,
          kv_bstride, bias_dist, bias_ld, mask, causal, static_cast<int>(Sq), static_cast<int>(Sk),
          static_cast<int>(dk), static_cast<T*>(ctx), ldctx));
  MT_CUDA_CHECK_LAUNCH();
}

void greedy_pick(const float* logits, int64_t B, int64_t V, int32_t banned, int32_t eos,
                 int32_t pad, uint8_t* finished, int32_t* ids, cudaStream_t stream) {
  if (B == 0) return;
  if (V < 1) fail("greedy_pick: empty vocabulary");
  greedy_pick_kernel<<<static_cast<unsigned>(B), kPickThreads, 0, stream>>>(logits, V, banned, eos,
                                                                            pad, finished, ids);
  MT_CUDA_CHECK_LAUNCH();
}

}  // namespace moetrace::cuda
