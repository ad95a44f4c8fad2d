// The decoder-only MoE language models (olmoe, mixtral, qwen2_moe, qwen3_moe) on one CUDA GPU: the
// twin of LmModel (model/lm/lm_model.h), with the same semantics, observation keys and results
// (docs/MOE_LM_SPEC.md; the GPU specifics in docs/GPU.md, "Language models").
//
// Precision: weights and GEMM operands in bf16 (default), fp16 or fp32, always with fp32
// accumulation; fp32 is the parity mode. The residual stream, every RMS norm, the q/k preparation
// (bias, q/k norms, clip, RoPE), the attention softmax and the whole router stay float32 in every
// mode: the router's logits are the float32 GEMM of the float32 post-attention norm output and the
// float32 router weight, so the top-k is decided in float32 as transformers decides it.
//
// One layer, n = B*Sq token rows (kernels/cuda/ops.h):
//   rmsnorm -> fused q|k|v GEMM (f32 out) -> lm_qkv_rope (bias, q/k norm, clip, RoPE, 1/sqrt(hd)
//   into q and straight into the KV cache) -> lm_attention (causal GQA, padding mask, sliding
//   window) -> o GEMM accumulated into x -> rmsnorm (f32 copy = the router input) ->
//   dense: gate|up GEMM, swiglu, down GEMM accumulated into x;
//   MoE: router GEMM (f32) -> moe_topk -> moe_plan / moe_permute over the n*k (token, slot) pairs
//   -> grouped gate|up GEMM with the SwiGLU epilogue -> grouped down GEMM writing one row per slot
//   -> (qwen2_moe: shared expert and its sigmoid gate) -> moe_combine (x += Σ_j w·row, in slot
//   order: no atomics, the same bits on every run).
// The expert plan stays on the device: no synchronization inside a pass.
//
// Observation (model/observer.h, the keys of LmModel): lm.{i}.hidden [B,S,d] F32 (router input),
// lm.{i}.router_logits [B,S,E] F32, lm.{i}.expert [B,S,k] I32, lm.{i}.gate [B,S,k] F32 for the
// prompt pass, lm.output [B,S,d] F32 from forward(); gen.{i}.* [B,1,...] once per cached
// generation step. Only the keys the observer wants(key) are copied, on the stream into pinned
// memory, and offered after the pass's (the prompt's, a generation step's) one synchronization.
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "core/tensor.h"
#include "model/cuda/cuda_switch_model.h"  // CudaOptions
#include "model/forward.h"
#include "model/lm/lm_config.h"
#include "model/lm/lm_model.h"
#include "model/observer.h"

namespace moetrace {

// How a prompt pass attends: kAuto: per layer three batched steps (q·kᵀ per (sequence, head) by
// cuBLAS, attention_softmax with the causal and padding masks, probs·v) where S <= 1024, there is
// no sliding window and the [B,H,S,S] scores and probs fit 4 GiB, else lm_attention; kFused: lm_attention always (one block per query row,
// no [B,H,S,S] scores). Generation steps always use lm_attention. Both give the same math.
enum class LmPromptAttention { kAuto, kFused };

class CudaLmModel {
 public:
  // Reads the model as LmModel::load does (config, generation_config's eos ids, the checkpoint,
  // expert weights left mapped) and uploads it in options.precision.
  static std::unique_ptr<CudaLmModel> load(const std::filesystem::path& dir,
                                           const CudaOptions& options);
  // Uploads a model already mapped on the host (its banned ids included).
  static std::unique_ptr<CudaLmModel> from_model(const LmModel& model, const CudaOptions& options);
  // A model of `config`'s shape with reproducible random weights made on the device
  // (cuda::fill_uniform; norms 1, no biases): benchmarks of checkpoints nobody has to download.
  static std::unique_ptr<CudaLmModel> random(const LmConfig& config, const CudaOptions& options,
                                             uint64_t seed);
  ~CudaLmModel();
  CudaLmModel(const CudaLmModel&) = delete;
  CudaLmModel& operator=(const CudaLmModel&) = delete;

  const LmConfig& config() const;
  DType precision() const;
  size_t device_bytes() const;  // weights + activations + caches held now
  double load_seconds() const;
  // Token ids greedy generation never picks (LmModel::banned_ids()).
  const std::vector<int64_t>& banned_ids() const;
  void set_banned_ids(std::vector<int64_t> ids);
  void set_prompt_attention(LmPromptAttention a);  // default kAuto

  // LmModel::forward: positions 0..S-1, padding keys masked; logits [B,S,V] F32; lm.* keys and
  // lm.output.
  Tensor forward(const Batch& batch, Observer* obs);
  // The prompt pass alone (no final norm, no LM head): the lm.* keys of a trace. Waits for it.
  void prefill(const Batch& batch, Observer* obs);
  // LmModel::generate: generate's prompt positions (cumsum(mask) - 1, pads 0), the first token
  // from column S-1's logits, then new_tokens - 1 cached steps (gen.* keys), banned ids never
  // chosen. ids [B, S + new_tokens]. S + new_tokens <= 8192.
  LmGenerateResult generate(const Batch& batch, int64_t new_tokens, Observer* obs);

  struct Impl;

 private:
  explicit CudaLmModel(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// run_lm_forward (model/lm/lm_forward.h) on the GPU engine: the same output names and shapes
// (logits, router.{k}.*, generated_ids, generate_position_ids, generate_router.{k}.*).
std::map<std::string, Tensor> run_lm_forward(CudaLmModel& model, const ForwardInputs& in,
                                             int64_t generate);

// The prompt positions of LmModel::generate (transformers' generate with right padding):
// cumsum(mask) - 1 over each row, pads 0. [B*S].
std::vector<int32_t> lm_generate_positions(const Batch& batch);

}  // namespace moetrace
