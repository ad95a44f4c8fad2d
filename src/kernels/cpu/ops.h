// The CPU ops of the Switch encoder and decoder: the reference twins of the GPU ops in
// kernels/cuda/ops.h, with the same names and, as far as host memory allows, the same arguments.
// No knowledge of models or files. Row-major float32 buffers, dense unless an ld (row stride, in
// elements) is given. `act` is the activation dtype the GPU rounds to (kF32, kBF16 or kF16): a CPU
// op rounds the same values with round_to() (core/dtype.h) and keeps them in float32, so a GPU op
// and its twin see the same rounded numbers; act = kF32 rounds nothing (the CPU engine's math).
// The residual stream, norms' sums, softmax sums and the router are float32 in every mode.
// tests/backend checks each op against a plain loop on odd sizes and, with a GPU, the GPU ops
// against these (one table of cases for both).
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include "core/dtype.h"

namespace moetrace::cpu {

// ---- Dense math ---------------------------------------------------------------------------------

// C[M,N] = alpha * A[M,K] · B[N,K]ᵀ + beta * C  (B in PyTorch Linear layout [out, in]).
// lda/ldb/ldc are row strides in elements. Runs on BLAS; threads itself unless called inside an
// OpenMP parallel region (then single-threaded).
void gemm_nt(int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
             const float* B, int64_t ldb, float beta, float* C, int64_t ldc);
// C[M,N] = alpha * A[M,K] · B[K,N] + beta * C.
void gemm_nn(int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
             const float* B, int64_t ldb, float beta, float* C, int64_t ldc);
// gemm_nt as three plain loops, the sum over k in double: the yardstick of the tests.
void gemm_nt_scalar(int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
                    const float* B, int64_t ldb, float beta, float* C, int64_t ldc);

// x[t,:] = float32(table[ids[t],:]) for t < T. table: [vocab, d] in table_dt (F32/BF16/F16). The
// ids must be valid rows (the model checks them).
void embed(const int32_t* ids, const void* table, DType table_dt, int64_t T, int64_t d, float* x);

// out[r,:] = act(w * x[r,:] * rsqrt(mean(x[r,:]²) + eps)) for r < rows, the sum of squares in
// float32 in column order; also the unrounded value into out_f32 when it is not null (the router's
// input). out may alias x.
void rmsnorm(const float* x, const float* w, int64_t rows, int64_t d, float eps, float* out,
             DType act = DType::kF32, float* out_f32 = nullptr);

// In-place softmax over each row of x[rows, n], max-subtracted, float32 sum. A row needs one
// finite entry: an all -inf row gives NaN, which is why masks add the lowest finite float (as
// transformers does).
void softmax_rows(float* x, int64_t rows, int64_t n);
// x[i] = act(max(x[i], 0)).
void relu_inplace(float* x, int64_t n, DType act = DType::kF32);
// x[i] = act(x[i]).
void round_inplace(float* x, int64_t n, DType act);

// ---- Attention (unscaled, T5) -------------------------------------------------------------------

// Attention probabilities of one layer, as the GPU's attention_softmax:
//   probs[b,h,i,:] = act(softmax(scores[b,h,i,:] + bias[h, j-i+Sk-1] + (mask[b,j] ? 0 : lowest)
//                                + (causal && j > i ? lowest : 0)))
// scores [B,H,Sq,Sk]; bias [H, 2*Sk-1] or null (no position bias); mask [B,Sk] or null (no
// padding). probs may alias scores.
void attention_softmax(const float* scores, const float* bias, const int32_t* mask, bool causal,
                       int64_t B, int64_t H, int64_t Sq, int64_t Sk, float* probs, DType act);

// Self-attention over packed qkv [B*S, 3*H*dk] (q | k | v, head-major: column h*dk + c), the twin
// of the GPU's flash_attention and of its unfused path (batched GEMMs + attention_softmax):
//   ctx[b,i,h,:] = act(Σ_j p_j · v[b,j,h,:]),  p = attention_softmax row (b,h,i) of q_i·k_j
// bias [H, 2S-1] or null, mask [B,S] or null. ctx [B*S, H*dk]. Operands already in `act`.
void attention(const float* qkv, const float* bias, const int32_t* mask, bool causal, int64_t B,
               int64_t S, int64_t H, int64_t dk, float* ctx, DType act);

// Attention of Sq query rows per sequence over Sk keys (decoder self-attention over its KV cache,
// cross-attention over the encoder's keys), as the GPU's decode_attention:
//   ctx[b,i,h,:] = act(Σ_j p_j · v[b,j,h,:]),  p = act(softmax_j(q[b,i,h]·k[b,j,h] + bias + mask))
// Query i sits at position pos = i + Sk - Sq; causal: keys j > pos get the lowest float (a
// probability of exactly 0). bias_dist [H, bias_ld] or null (causal only): key j <= pos gets
// bias_dist[h, pos - j]. mask [B, Sk] or null: a 0 adds the lowest float.
// Rows: q (b,i) at q + (b*Sq + i)*ldq + h*dk; k/v (b,j) at k/v + b*kv_bstride + j*ldkv + h*dk;
// ctx (b,i) at ctx + (b*Sq + i)*ldctx + h*dk.
void decode_attention(const float* q, int64_t ldq, const float* k, const float* v, int64_t ldkv,
                      int64_t kv_bstride, const float* bias_dist, int64_t bias_ld,
                      const int32_t* mask, bool causal, int64_t B, int64_t H, int64_t Sq,
                      int64_t Sk, int64_t dk, float* ctx, int64_t ldctx, DType act);

// ---- Decoding -----------------------------------------------------------------------------------

// The greedy choice of one generation step, per sequence b:
//   next = first maximum of logits[b,:] with logits[b, banned] read as -inf (when banned >= 0:
//   eos before min_new_tokens); if finished[b]: next = pad; if next == eos: finished[b] = 1;
//   ids[b] = next.
// logits [B, V], finished [B] (in/out), ids [B] (out).
void greedy_pick(const float* logits, int64_t B, int64_t V, int32_t banned, int32_t eos,
                 int32_t pad, uint8_t* finished, int32_t* ids);

// ---- Mixture of experts -------------------------------------------------------------------------

// The Switch router after its logits, per sequence b, exactly as SWITCH_SPEC.md:
//   probs = act(softmax(logits[b,s,:])) (float32 softmax, rounded to the activation dtype),
//   expert = argmax(probs) (lowest index on ties), gate = max(probs),
//   rank = number of earlier positions s' < s of sequence b with the same expert (pad tokens
//   count), dropped = rank >= capacity.
// logits [B,S,E]. Writes expert [B*S], dropped [B*S], gate [B*S] and adds the kept tokens of each
// expert to counts[E] (zero it first).
void moe_route(const float* logits, int64_t B, int64_t S, int64_t E, int64_t capacity, DType act,
               int32_t* expert, uint8_t* dropped, float* gate, int32_t* counts);

// Float32 weights of one expert: wi [F, K], wo [K, F] (PyTorch Linear layout).
struct ExpertWeights {
  const float* wi;
  const float* wo;
};
// Returns expert e's weights, converting into the scratch vectors when they are stored in another
// dtype; called once per expert with tokens, possibly from several threads at once (each with its
// own scratch).
using ExpertWeightsFn = std::function<ExpertWeights(int64_t e, std::vector<float>& wi_scratch,
                                                    std::vector<float>& wo_scratch)>;

// The expert FFN over T tokens h [T, K] (already in act precision) routed by moe_route:
//   x[t,:] += gate[t] · (act(relu(h[t,:] · Wi[e]ᵀ)) · Wo[e]ᵀ)   e = expert[t], kept tokens only;
// a dropped token adds nothing (it is carried by the residual). x [T, K] float32. One GEMM pair
// per expert over its tokens in position order; experts run in parallel, busiest first.
void moe_ffn(const float* h, int64_t T, int64_t K, int64_t F, int64_t E,
             const ExpertWeightsFn& weights, const int32_t* expert, const uint8_t* dropped,
             const float* gate, DType act, float* x);

// ---- Decoder-only MoE language models (olmoe, mixtral, qwen2_moe, qwen3_moe) --------------------
// The twins of kernels/cuda/ops.h's LM ops (same names and arguments; outputs rounded to act as the
// GPU stores them). docs/MOE_LM_SPEC.md has the models' math.

// The RoPE tables of the inverse frequencies inv_freq [hd/2] (model/lm's rope_inv_freq: the one
// statement of the rule), float32 as transformers computes them:
//   angle = float(p) * inv_freq[c], cos[p, c] = cos(angle), sin[p, c] = sin(angle) (float32)
// for p < P, c < hd/2. cos and sin get [P, hd/2] each.
void rope_table(const std::vector<float>& inv_freq, int64_t P, std::vector<float>& cos,
                std::vector<float>& sin);

// See cuda::QkNormKind.
enum class QkNormKind { kNone, kFull, kPerHead };

// The twin of cuda::lm_qkv_rope: bias, q/k RMS norms, clip, RoPE at pos[t] from the rope_table
// tables, q times q_scale; q rows [B*Sq, ldq] and k | v rows into kv + b*kv_bstride +
// (t0 + s)*ldkv, rounded to act.
void lm_qkv_rope(const float* qkv, const float* bias, float clip, QkNormKind norm,
                 const float* q_norm, const float* k_norm, float eps, const int32_t* pos,
                 const float* cos, const float* sin, float q_scale, int64_t B, int64_t Sq,
                 int64_t H, int64_t KV, int64_t hd, float* q, int64_t ldq, float* kv, int64_t ldkv,
                 int64_t kv_bstride, int64_t t0, DType act);

// The twin of cuda::lm_attention: causal grouped-query attention (G = H/KV), the sliding window
// when window > 0, mask [B, mask_ld] or null, q pre-scaled; probs and ctx rounded to act.
void lm_attention(const float* q, int64_t ldq, const float* k, const float* v, int64_t ldkv,
                  int64_t kv_bstride, const int32_t* mask, int64_t mask_ld, int64_t window,
                  int64_t B, int64_t H, int64_t KV, int64_t Sq, int64_t Sk, int64_t hd, float* ctx,
                  int64_t ldctx, DType act);

// The twin of cuda::moe_topk: float32 softmax over E (exp(l - max) / sum), the k largest in
// descending order (ties to the lowest index), renormalized when renorm; counts[e] += slots of e.
// The same numbers as model/lm's lm_topk_route (the rule; tests/cuda/lm_twin_pipeline_test.cc).
void moe_topk(const float* logits, int64_t T, int64_t E, int64_t k, bool renorm, int32_t* expert,
              float* weight, int32_t* counts);

// Float32 weights of one SwiGLU expert: gate_up [2F, d] with gate and up rows interleaved (row 2f
// = gate_f, 2f + 1 = up_f), down [d, F].
struct SwiGluWeights {
  const float* gate_up;
  const float* down;
};
using SwiGluWeightsFn = std::function<SwiGluWeights(int64_t e, std::vector<float>& gate_up_scratch,
                                                    std::vector<float>& down_scratch)>;

// The experts of a top-k router, one output row per slot (the twin of the GPU's grouped GEMMs
// with the kSwiGlu and kRows epilogues):
//   rows[t*k + j, :] = down[e] · act(silu(g) * u),  g | u = gate_up[e] · h[t, :],  e = expert[t,j]
// h [T, d] in act precision, rows [T*k, d] float32. Experts run in parallel.
void moe_swiglu_experts(const float* h, int64_t T, int64_t d, int64_t F, int64_t E, int64_t k,
                        const SwiGluWeightsFn& weights, const int32_t* expert, DType act,
                        float* rows);

// The twin of cuda::moe_combine: x[t,:] += Σ_j act(weight[t,j]) · rows[t*k + j,:] (+ the shared
// expert times sigmoid(shared_gate[t])), the sum formed first.
void moe_combine(const float* rows, const float* weight, int64_t T, int64_t k, int64_t d,
                 const float* shared, const float* shared_gate, DType act, float* x);

// The twin of cuda::swiglu: out[r, f] = act(silu(in[r, 2f]) * in[r, 2f+1]).
void swiglu(const float* in, int64_t rows, int64_t F, float* out, DType act);

// The twin of cuda::fill_uniform: dst[i] = act(lo + (hi - lo) * u(seed, i)) (float32 values).
void fill_uniform(float* dst, int64_t n, DType act, uint64_t seed, float lo, float hi);
// u(seed, i) of fill_uniform, in [0, 1).
inline float uniform_hash(uint64_t seed, uint64_t i) {
  uint64_t z = seed + i * 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  return static_cast<float>(z >> 40) * 0x1p-24f;
}

// ---- Threads ------------------------------------------------------------------------------------

// Sets the BLAS/OpenMP thread count for this process (0 = leave the default).
void set_num_threads(int n);
int num_threads();

}  // namespace moetrace::cpu
