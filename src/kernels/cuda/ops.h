// GPU kernels of the Switch encoder and decoder, as host launchers on a stream. No knowledge of
// models or files. Pointers are device pointers; row-major, dense unless an ld (row stride, in
// elements) is given. `act` is the activation dtype of GEMM operands: kF32, kBF16 or kF16. The
// residual stream, norms, softmax and everything of the router are float32 in every mode. Each op
// has a CPU twin of the same name in kernels/cpu/ops.h (the CPU engine's ops, act rounding
// modelled); tests/backend compares the two on random inputs of odd sizes for f32, bf16 and f16.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "core/dtype.h"

namespace moetrace::cuda {

// x[t,:] = float32(table[ids[t],:]) for t < T. table: [vocab, d] in table_dt (F32/BF16/F16).
void embed(const int32_t* ids, const void* table, DType table_dt, int64_t T, int64_t d, float* x,
           cudaStream_t stream);

// out[r,:] = act(w * x[r,:] * rsqrt(mean(x[r,:]²) + eps)) for r < rows; also the float32 value into
// out_f32 when it is not null (the router's input). x, w float32.
void rmsnorm(const float* x, const float* w, int64_t rows, int64_t d, float eps, void* out,
             DType act, float* out_f32, cudaStream_t stream);

// Converts n float32 values to dst_dt (F32, BF16, F16): the capture of fp16 logits, tests.
void convert_f32(const float* src, int64_t n, void* dst, DType dst_dt, cudaStream_t stream);

// Attention probabilities of one layer, in place of the scores' softmax:
//   probs[b,h,i,:] = act(softmax(scores[b,h,i,:] + bias[h, j-i+Sk-1] + (mask[b,j] ? 0 : lowest)))
// scores [B,H,Sq,Sk] float32; bias [H, 2*Sk-1] float32 or null (no position bias); mask [B,Sk]
// int32 or null (no padding); causal masks j > i (decoder self-attention; Sq == Sk). Sk <= 1024.
void attention_softmax(const float* scores, const float* bias, const int32_t* mask, bool causal,
                       int64_t B, int64_t H, int64_t Sq, int64_t Sk, void* probs, DType act,
                       cudaStream_t stream);

// Pointer tables for the per-(b,h) attention GEMMs over a packed qkv buffer [B*S, 3*H*dk] (q | k |
// v, each head-major: column h*dk + c) and ctx [B*S, H*dk]; scores/probs [B,H,S,S]. Each table has
// B*H entries, written on the device: q, k, v, scores, probs, ctx.
struct AttentionPointers {
  const void** q;
  const void** k;
  const void** v;
  void** scores;
  const void** probs;
  void** ctx;
};
void attention_pointers(const void* qkv, const float* scores, const void* probs, void* ctx,
                        int64_t B, int64_t S, int64_t H, int64_t dk, DType act, AttentionPointers p,
                        cudaStream_t stream);

// Fused self-attention over packed qkv [B*S, 3*H*dk] (q | k | v, head-major columns): for each
// (b, h), ctx[b,i,h,:] = softmax_j(q_i·k_j + bias[h, j-i+S-1] + (mask[b,j] ? 0 : lowest)) · v_j,
// unscaled (T5), float32 softmax, probs rounded to the activation dtype for the probs·v product.
// ctx [B*S, H*dk]. bias [H, 2S-1] or null, mask [B,S] or null. Only where
// flash_attention_supported(): d_kv = 64, S <= 1024, BF16/F16 (elsewhere the unfused path:
// batched GEMMs + attention_softmax).
// pairs (CudaOptions' Fp32Parts::attention_pairs): the probabilities enter probs·v as hi + lo of
// the activation dtype (hi = act(p), lo = act(p - hi)), and ctx is [B*S, 2*H*dk]: columns
// [0, H*dk) the output's hi half, [H*dk, 2*H*dk) its lo half (ctx ≈ hi + lo to ~22 bits in f16),
// for an o-projection over K = 2*H*dk against [Wo | Wo].
bool flash_attention_supported(int64_t dk, int64_t S, DType act);
void flash_attention(const void* qkv, const float* bias, const int32_t* mask, int64_t B, int64_t S,
                     int64_t H, int64_t dk, void* ctx, DType act, cudaStream_t stream,
                     bool pairs = false);

// ---- Decoder ------------------------------------------------------------------------------------

// Attention of Sq query rows per sequence over Sk cached keys (decoder self-attention over its KV
// cache, cross-attention over the encoder's keys), one block per (query, head, sequence):
//   ctx[b,i,h,:] = Σ_j p_j · v[b,j,h,:],  p = act(softmax_j(q[b,i,h]·k[b,j,h] + bias + mask))
// unscaled (T5), float32 scores and softmax, probs rounded to the activation dtype. Query i sits
// at position pos = i + Sk - Sq; causal: it sees keys j <= pos only. bias_dist [H, bias_ld] float32
// or null (causal only): key j gets bias_dist[h, pos - j], the bias of its distance behind the
// query. mask [B, Sk] int32 or null: a 0 adds the lowest float (HF's finite mask).
// Rows: q (b,i) at q + (b*Sq + i)*ldq + h*dk; k/v (b,j) at k/v + b*kv_bstride + j*ldkv + h*dk;
// ctx (b,i) at ctx + (b*Sq + i)*ldctx + h*dk. All in `act`. dk <= 128, Sk <= kDecodeMaxKeys,
// B <= 65535.
constexpr int64_t kDecodeMaxKeys = 8192;
void decode_attention(const void* q, int64_t ldq, const void* k, const void* v, int64_t ldkv,
                      int64_t kv_bstride, const float* bias_dist, int64_t bias_ld,
                      const int32_t* mask, bool causal, int64_t B, int64_t H, int64_t Sq,
                      int64_t Sk, int64_t dk, void* ctx, int64_t ldctx, DType act,
                      cudaStream_t stream);

// The greedy choice of one generation step, per sequence b, as SwitchModel::generate makes it:
//   next = first maximum of logits[b,:] (token `banned` excluded when >= 0: eos before
//   min_new_tokens); if finished[b]: next = pad; if next == eos: finished[b] = 1; ids[b] = next.
// logits [B, V] float32, finished [B] uint8 (in/out), ids [B] int32 (out).
void greedy_pick(const float* logits, int64_t B, int64_t V, int32_t banned, int32_t eos,
                 int32_t pad, uint8_t* finished, int32_t* ids, cudaStream_t stream);

// ---- Mixture of experts ------------------------------------------------------------------------

// The Switch router after its logits, per sequence b (one block each), exactly as SWITCH_SPEC.md:
//   probs = probs_dt(softmax(logits[b,s,:])) (float32 softmax, rounded to probs_dt: the
//           activation dtype as transformers does, or kF32 to decide in float32),
//   expert = argmax(probs) (lowest index on ties), gate = max(probs),
//   rank = number of earlier positions s' < s of sequence b with the same expert (pad tokens
//   count), dropped = rank >= capacity.
// logits [B,S,E] float32. Writes expert [B*S] int32, dropped [B*S] uint8, gate [B*S] float32 and
// adds the kept tokens of each expert to counts[E] (zero it first). When logits_f16 is not null the
// logits are also written there as float16 (the capture copy). S <= 1024.
void moe_route(const float* logits, int64_t B, int64_t S, int64_t E, int64_t capacity,
               DType probs_dt, int32_t* expert, uint8_t* dropped, float* gate, int32_t* counts,
               uint16_t* logits_f16, cudaStream_t stream);

// One block: offsets[e] = sum of counts[< e] (offsets[E] = kept tokens), and the tile table of the
// grouped GEMMs: tile i < n_tiles covers rows [tile_row[i], tile_row[i] + tile_m) of expert
// tile_expert[i] (row numbers within the permuted order); the remaining of max_tiles entries get
// tile_expert = -1. max_tiles must be >= ceil(T/tile_m) + E. Zeroes cursor[E].
void moe_plan(const int32_t* counts, int64_t E, int tile_m, int64_t max_tiles, int32_t* offsets,
              int32_t* tile_expert, int32_t* tile_row, int32_t* cursor, cudaStream_t stream);

// perm[offsets[e] + k] = token (k-th kept token of expert e in arrival order, not deterministic;
// the result does not depend on it). T tokens; dropped may be null (none dropped: the top-k
// routers' flattened [T*k] slots, where "token" is then the slot t*k + j).
void moe_permute(const int32_t* expert, const uint8_t* dropped, int64_t T, const int32_t* offsets,
                 int32_t* cursor, int32_t* perm, cudaStream_t stream);

// Grouped expert GEMM over the permuted rows, one weight matrix per expert:
//   for every tile of the table, rows r of expert e:
//     acc[r,:] = A[row(r),:] · W[e]ᵀ                      W[e]: [N, K]
// A rows come from perm (a_gather: A row = perm[r], the token) or are r itself (A already
// permuted). The epilogue:
//   kRelu:          out[r,:] = act(relu(acc))             out: [rows, ldo], act dtype
//   kGateResidual:  x[perm[r],:] += gate[perm[r]] * acc   x: float32 [T, ldo]; the un-permute is
//                   fused into the residual add (each token appears once)
//   kSwiGlu:        out[r, n/2] = act(silu(acc[n]) * acc[n+1]) for even n   out: [rows, ldo] act;
//                   W[e] holds gate and up rows interleaved (row 2f = gate_f, 2f+1 = up_f), N = 2F
//   kRows:          out[perm[r],:] = acc                  out: float32 [slots, ldo], one row per
//                   routed slot (the top-k sum is left to moe_combine: deterministic, no atomics)
// a_div: with a_gather, A row = perm[r] / a_div (perm holds the slots t*k + j of a top-k router,
// a_div = k; 1 for Switch). W: [E, N, K] act dtype contiguous. K % 8 == 0. fp32 runs a plain SIMT
// kernel (no TF32).
enum class GroupedEpilogue { kRelu, kGateResidual, kSwiGlu, kRows };
constexpr int kGroupedTileM = 128;  // tile_m to pass to moe_plan for bf16/f16
constexpr int kGroupedTileMF32 = 64;
int grouped_tile_m(DType act);
void grouped_gemm(const void* A, int64_t lda, bool a_gather, const int32_t* perm, const void* W,
                  int64_t N, int64_t K, const int32_t* tile_expert, const int32_t* tile_row,
                  const int32_t* offsets, int64_t max_tiles, GroupedEpilogue epilogue, void* out,
                  int64_t ldo, const float* gate, DType act, cudaStream_t stream,
                  int64_t a_div = 1);

// ---- Decoder-only MoE language models (olmoe, mixtral, qwen2_moe, qwen3_moe) --------------------
// docs/MOE_LM_SPEC.md has the models' math; these are its pieces. CPU twins in kernels/cpu/ops.h.

// The q/k RMS norm of an attention layer (none; over the whole q / k projection, olmoe; per head
// with one [hd] weight, qwen3_moe).
enum class QkNormKind { kNone, kFull, kPerHead };

// Everything between the fused q|k|v projection and the attention, per token t = b*Sq + s:
//   qkv [B*Sq, (H + 2*KV)*hd] float32 (q | k | v, head-major: column h*hd + c), the GEMM output;
//   1. + bias[(H + 2*KV)*hd] when bias is not null (qwen2_moe);
//   2. q/k RMS norms (eps): kFull: q over its H*hd values times q_norm[H*hd], k over its KV*hd
//      values times k_norm[KV*hd]; kPerHead: every head over its hd values times q_norm[hd] /
//      k_norm[hd];
//   3. q, k and v clamped to [-clip, clip] when clip > 0 (olmoe's clip_qkv, after its norms);
//   4. RoPE (rotate_half) at position p = pos[t] of q and k: for c < hd/2,
//      x'[c] = x[c]*cos[p,c] - x[c+hd/2]*sin[p,c],  x'[c+hd/2] = x[c+hd/2]*cos[p,c] + x[c]*sin[p,c]
//      with cos/sin [P, hd/2] float32 (cpu::rope_table), 0 <= p < P;
//   5. q times q_scale (the attention's 1/sqrt(hd), folded into q).
// Writes, in act: q of token t at q + t*ldq; k of (b, s) at kv + b*kv_bstride + (t0 + s)*ldkv and
// v at the same row + KV*hd: straight into a KV cache [B, Smax, 2*KV*hd] (t0: the first new
// position). (H + 2*KV)*hd <= 12288, hd even.
void lm_qkv_rope(const float* qkv, const float* bias, float clip, QkNormKind norm,
                 const float* q_norm, const float* k_norm, float eps, const int32_t* pos,
                 const float* cos, const float* sin, float q_scale, int64_t B, int64_t Sq,
                 int64_t H, int64_t KV, int64_t hd, void* q, int64_t ldq, void* kv, int64_t ldkv,
                 int64_t kv_bstride, int64_t t0, DType act, cudaStream_t stream);

// Causal grouped-query attention of Sq query rows per sequence over its first Sk cached keys (the
// prompt pass: Sq = Sk; a generation step: Sq = 1), G = H / KV query heads per key/value head:
//   ctx[b,i,h,:] = act(Σ_j p_j · v[b,j,h/G,:]),  p = act(softmax_j(q[b,i,h]·k[b,j,h/G] + mask))
// float32 scores and softmax, unscaled (q carries the scale). Query i sits at cache position
// pos = i + Sk - Sq and sees keys j <= pos, and only those with pos - j < window when window > 0
// (mixtral's sliding window); mask [B, mask_ld] int32 (keys 0..Sk-1 of row b at mask + b*mask_ld)
// or null: a 0 adds the lowest float (HF's finite mask). Rows: q (b,i) at q + (b*Sq + i)*ldq + h*hd; k/v (b,j) at k/v + b*kv_bstride + j*ldkv +
// (h/G)*hd; ctx (b,i) at ctx + (b*Sq + i)*ldctx + h*hd. All in act. hd <= 256, Sk <=
// kDecodeMaxKeys, H % KV == 0.
void lm_attention(const void* q, int64_t ldq, const void* k, const void* v, int64_t ldkv,
                  int64_t kv_bstride, const int32_t* mask, int64_t mask_ld, int64_t window,
                  int64_t B, int64_t H, int64_t KV, int64_t Sq, int64_t Sk, int64_t hd, void* ctx,
                  int64_t ldctx, DType act, cudaStream_t stream);

// The top-k router after its float32 logits, one warp per token t < T:
//   p = softmax(logits[t,:]) in float32; expert[t, 0..k-1] = the k largest p in descending order,
//   ties to the lowest index; weight[t,j] = p[expert[t,j]], divided by the k values' sum (added in
//   slot order) when renorm; counts[e] += the slots that chose e (zero it first).
// logits [T,E], expert [T,k] int32, weight [T,k] float32 (unrounded: moe_combine rounds). E <= 256,
// 1 <= k <= min(E, 32).
void moe_topk(const float* logits, int64_t T, int64_t E, int64_t k, bool renorm, int32_t* expert,
              float* weight, int32_t* counts, cudaStream_t stream);

// The MoE output added to the residual stream, per token t:
//   x[t,:] += Σ_j act(weight[t,j]) · rows[t*k + j,:]   (j in slot order)
//             + sigmoid(shared_gate[t]) · shared[t,:]   (qwen2_moe's shared expert, when not null)
// the sum formed first, then added. rows [T*k, d], shared [T, d], shared_gate [T], x [T, d] float32.
void moe_combine(const float* rows, const float* weight, int64_t T, int64_t k, int64_t d,
                 const float* shared, const float* shared_gate, DType act, float* x,
                 cudaStream_t stream);

// out[r, f] = act(silu(in[r, 2f]) * in[r, 2f+1]), silu(g) = g / (1 + exp(-g)), for r < rows,
// f < F: in [rows, 2F] float32 with gate and up interleaved (the dense MLP and the shared expert,
// whose stacked weights are laid out as the experts' for kSwiGlu). out [rows, F] act.
void swiglu(const float* in, int64_t rows, int64_t F, void* out, DType act, cudaStream_t stream);

// x[r, :] += bias[:] for r < rows: x [rows, d] float32 (an o projection's bias).
void add_bias(float* x, const float* bias, int64_t rows, int64_t d, cudaStream_t stream);

// dst[i, :] = src[rows[i], :] for i < n: float32 rows of width d (the last position of each
// sequence before the LM head).
void gather_rows(const float* src, const int32_t* rows, int64_t n, int64_t d, float* dst,
                 cudaStream_t stream);

// logits[b, ids[i]] = -inf for b < B, i < n_ids (eos before min_new_tokens). ids on the device.
void ban_tokens(float* logits, int64_t B, int64_t V, const int32_t* ids, int64_t n_ids,
                cudaStream_t stream);

// dst[i] = act(lo + (hi - lo) * u(seed, i)) for i < n, u = the top 24 bits of splitmix64(seed +
// i * 0x9E3779B97F4A7C15) over 2^24: reproducible random weights made on the device (benchmarks of
// models too large to pass through the host). cpu::fill_uniform gives the same values.
void fill_uniform(void* dst, int64_t n, DType act, uint64_t seed, float lo, float hi,
                  cudaStream_t stream);

}  // namespace moetrace::cuda
