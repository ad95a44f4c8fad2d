// `moetrace forward`: the model on given ids, with outputs named exactly as the fixtures'
// reference.safetensors (encoder_hidden_states.{i}, encoder_router.{n}.*, decoder_router.{n}.*,
// logits, generated_ids, generate_decoder_router.{n}.*), so anyone can compare against
// transformers.
#pragma once

#include <map>
#include <string>

#include "core/tensor.h"
#include "model/engine.h"
#include "model/switch_model.h"

namespace moetrace {

struct ForwardInputs {
  Batch batch;
  std::vector<int32_t> decoder_input_ids;  // [B, T] or empty
  int64_t T = 0;
};

// Reads input_ids [B,S], attention_mask [B,S] (I32 or I64) and optional decoder_input_ids [B,T].
ForwardInputs read_forward_inputs(const std::filesystem::path& path);

// Runs encoder, the teacher-forced decoder when decoder ids are given and the model has a decoder,
// and greedy generation of exactly `generate` tokens (eos masked) when generate > 0, on any engine
// (`moetrace forward --device`): the same keys from every one.
std::map<std::string, Tensor> run_forward(Engine& engine, const SwitchConfig& config,
                                          const ForwardInputs& in, int64_t generate);
// The same on the CPU engine over `model`.
std::map<std::string, Tensor> run_forward(const SwitchModel& model, const ForwardInputs& in,
                                          int64_t generate);

}  // namespace moetrace
