// The decoder-only MoE language models behind the Engine interface (model/engine.h), on the CPU:
// LmModel, exactly (docs/MOE_LM_SPEC.md). The GPU twin is engine/cuda_engine.cc's over CudaLmModel.
//
//   encode(batch, obs)            the prompt pass: model.forward's positions 0..S-1, lm.{i}.* keys
//   generate(enc, batch, N, ...)  LmModel::generate's N greedy tokens (eos never chosen), gen.{i}.*
//                                 keys per cached step; its own prompt pass offers nothing (encode
//                                 did). ids [B, N] (GenerateResult: steps = N - 1, ids[b] = the N
//                                 new tokens: step t routes token t and produces token t + 1).
//   submit(batch, request, N > 0) one generate() whose prompt pass offers the lm.* keys too.
//   decode                        an error: there is no teacher-forced decoder pass
// For right-padded rows greedy generation continues from the batch's last column as transformers
// does (a pad for the shorter rows): collect therefore generates from batches of equal length.
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "core/error.h"
#include "model/capture_now.h"
#include "model/engine.h"
#include "model/lm/lm_model.h"

namespace moetrace {

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

std::unique_ptr<Engine> lm_cpu_engine(std::unique_ptr<LmModel> model);

// The Engine of either language-model engine (Model: LmModel or CudaLmModel), computing each batch
// at submit(); `prompt` runs the prompt pass of encode() (the CPU's forward, the GPU's prefill).
template <class Model>
class LmEngine : public ComputeAtSubmit {
 public:
  using Prompt = std::function<void(Model&, const Batch&, Observer*)>;
  LmEngine(std::unique_ptr<Model> model, std::string device, Prompt prompt)
      : model_(std::move(model)), device_(std::move(device)), prompt_(std::move(prompt)) {}

  bool has_decoder() const override { return false; }
  std::string device() const override { return device_; }

  Encoded encode(const Batch& batch, Observer* obs) override {
    check_batch(batch, model_->config().vocab_size, "encode");
    prompt_(*model_, batch, obs);
    return Encoded{};
  }
  Tensor decode(const Encoded&, const Batch&, const std::vector<int32_t>&, int64_t,
                Observer*) override {
    fail("decode: ", lm_family_name(model_->config().family),
         " is a decoder-only language model: it has no teacher-forced decoder pass");
  }
  GenerateResult generate(const Encoded&, const Batch& batch, int64_t max_new_tokens, int64_t,
                          Observer* obs) override {
    check_batch(batch, model_->config().vocab_size, "generate");
    if (max_new_tokens < 1) fail("generate: max_new_tokens ", max_new_tokens, ", expected >= 1");
    GenerationKeysOnly gen_only(obs);
    return as_generate_result(model_->generate(batch, max_new_tokens, obs ? &gen_only : nullptr));
  }

 protected:
  Model& model() const { return *model_; }

  // A batch with generation in one pass: generate()'s own prompt pass offers the lm.* keys (its
  // positions are forward's for every real token of a right-padded row), its cached steps the
  // gen.* keys; encode() first would run the prompt twice.
  std::unique_ptr<CapturedBatch> capture(const Batch& batch, const Observer& request,
                                         int64_t max_new_tokens) override {
    if (max_new_tokens == 0) return ComputeAtSubmit::capture(batch, request, 0);
    check_batch(batch, model_->config().vocab_size, "generate");
    return capture_with(batch, request, [&](Observer* rec) {
      return as_generate_result(model_->generate(batch, max_new_tokens, rec));
    });
  }

 private:
  std::unique_ptr<Model> model_;
  std::string device_;
  Prompt prompt_;
};

}  // namespace moetrace
