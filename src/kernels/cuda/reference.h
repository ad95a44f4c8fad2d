// Plain CPU twins of the GPU ops in kernels/cuda/ops.h (float32, scalar loops, no threads), for the
// tests in tests/cuda. `act` rounding is modelled with moetrace's bf16/fp16 conversions, so a GPU
// op and its twin see the same rounded inputs.
#pragma once

#include <cstdint>
#include <vector>

#include "core/dtype.h"

namespace moetrace::cuda::ref {

void embed(const std::vector<int32_t>& ids, const std::vector<float>& table, int64_t d,
           std::vector<float>& x);
void rmsnorm(const std::vector<float>& x, const std::vector<float>& w, int64_t rows, int64_t d,
             float eps, std::vector<float>& out);
void attention_softmax(const std::vector<float>& scores, const float* bias, const int32_t* mask,
                       bool causal, int64_t B, int64_t H, int64_t Sq, int64_t Sk,
                       std::vector<float>& probs);
// decode_attention (ops.h) with float32 operands (already rounded to act); probs rounded to act.
void decode_attention(const std::vector<float>& q, int64_t ldq, const float* k, const float* v,
                      int64_t ldkv, int64_t kv_bstride, const float* bias_dist, int64_t bias_ld,
                      const int32_t* mask, bool causal, int64_t B, int64_t H, int64_t Sq,
                      int64_t Sk, int64_t dk, DType act, std::vector<float>& ctx, int64_t ldctx);
// greedy_pick (ops.h): std::max_element per row, then the finished bookkeeping.
void greedy_pick(const std::vector<float>& logits, int64_t B, int64_t V, int32_t banned,
                 int32_t eos, int32_t pad, std::vector<uint8_t>& finished,
                 std::vector<int32_t>& ids);
// Route as moe_route (expert, dropped, gate per token; counts of kept tokens per expert).
void moe_route(const std::vector<float>& logits, int64_t B, int64_t S, int64_t E, int64_t capacity,
               DType act, std::vector<int32_t>& expert, std::vector<uint8_t>& dropped,
               std::vector<float>& gate, std::vector<int32_t>& counts);
// The whole expert layer on tokens h [T, K] (rows already in act precision), experts Wi [E, F, K],
// Wo [E, K, F]: x[t] += gate[t] * (act(relu(h[t]·Wi[e]ᵀ)) · Wo[e]ᵀ) for kept tokens.
void moe_ffn(const std::vector<float>& h, const std::vector<float>& wi,
             const std::vector<float>& wo, const std::vector<int32_t>& expert,
             const std::vector<uint8_t>& dropped, const std::vector<float>& gate, int64_t T,
             int64_t K, int64_t F, DType act, std::vector<float>& x);
// Relative position bucket (SWITCH_SPEC.md), float32 log as Mesh-TF.
int64_t relative_bucket(int64_t rp, bool bidirectional, int64_t num_buckets, int64_t max_distance);

}  // namespace moetrace::cuda::ref
