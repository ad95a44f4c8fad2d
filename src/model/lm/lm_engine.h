// The decoder-only MoE language models behind the Engine interface (model/engine.h), on the CPU:
// LmModel, exactly (docs/MOE_LM_SPEC.md). The GPU twin is engine/cuda_engine.cc's over CudaLmModel.
//
//   encode(batch, obs)            the prompt pass: model.forward's positions 0..S-1, lm.{i}.* keys
//   generate(enc, batch, N, ...)  LmModel::generate's N greedy tokens (eos never chosen), gen.{i}.*
//                                 keys per cached step; its own prompt pass offers nothing (encode
//                                 did). ids [B, N] (GenerateResult: steps = N - 1, ids[b] = the N
//                                 new tokens: step t routes token t and produces token t + 1).
//   decode                        an error: there is no teacher-forced decoder pass
// For right-padded rows greedy generation continues from the batch's last column as transformers
// does (a pad for the shorter rows): collect therefore generates from batches of equal length.
#pragma once

#include <memory>
#include <string>

#include "model/engine.h"
#include "model/lm/lm_model.h"

namespace moetrace {

std::unique_ptr<Engine> lm_cpu_engine(std::unique_ptr<LmModel> model);

// LmGenerateResult (the prompt, then N tokens) as the Engine's GenerateResult (the N new tokens,
// steps = N - 1); shared by both engines' adapters.
GenerateResult as_generate_result(const LmGenerateResult& g);

// An observer that passes on only the generation steps' keys (gen.*) of `inner`: the prompt pass
// inside generate() repeats what encode() offered.
class GenerationKeysOnly : public Observer {
 public:
  explicit GenerationKeysOnly(Observer* inner) : inner_(inner) {}
  bool wants(std::string_view key) const override;
  std::optional<DType> preferred_dtype(std::string_view key) const override {
    return inner_->preferred_dtype(key);
  }
  void observe(std::string_view key, const TensorView& t) override { inner_->observe(key, t); }

 private:
  Observer* inner_;
};

}  // namespace moetrace
