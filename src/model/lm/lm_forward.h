// `moetrace forward` for a decoder-only MoE language model: the outputs named as the LM fixtures'
// reference.safetensors (docs/MOE_LM_SPEC.md, "moetrace forward"), per MoE layer k (k counts MoE
// layers only, in layer order):
//   router.{k}.router_logits [B,S,E] F32   router.{k}.topk_ids     [B,S,k] I32
//   router.{k}.topk_weights  [B,S,k] F32   router.{k}.router_input [B,S,d] F32
//   logits [B,S,V] F32, and with generate = N > 0: generated_ids [B,S+N] I32,
//   generate_position_ids [B,S+N-1] I64 and, for N > 1, generate_router.{k}.* [B,N-1,...] (the
//   router of each cached step j = 1..N-1, which feeds new token j).
#pragma once

#include <functional>
#include <map>
#include <string>

#include "core/tensor.h"
#include "model/forward.h"
#include "model/lm/lm_model.h"

namespace moetrace {

// model.forward over the inputs (positions 0..S-1), then, when generate > 0, greedy generation of
// exactly `generate` tokens (eos never chosen).
std::map<std::string, Tensor> run_lm_forward(const LmModel& model, const ForwardInputs& in,
                                             int64_t generate);

// The same over any engine of the model (the GPU's CudaLmModel too): its forward (logits, lm.*
// keys) and generate (gen.* keys).
using LmForwardFn = std::function<Tensor(const Batch&, Observer*)>;
using LmGenerateFn = std::function<LmGenerateResult(const Batch&, int64_t, Observer*)>;
std::map<std::string, Tensor> run_lm_forward(const LmConfig& config, const LmForwardFn& forward,
                                             const LmGenerateFn& generate_fn,
                                             const ForwardInputs& in, int64_t generate);

}  // namespace moetrace
