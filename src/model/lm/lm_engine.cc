#include "model/lm/lm_engine.h"

#include <deque>

#include "core/error.h"
#include "core/keys.h"
#include "model/capture_now.h"
#include "model/cpu_engine.h"

namespace moetrace {

bool GenerationKeysOnly::wants(std::string_view key) const {
  const auto p = keys::parse(key);
  return p && p->stack == keys::Stack::kGen && inner_->wants(key);
}

GenerateResult as_generate_result(const LmGenerateResult& g) {
  GenerateResult r;
  r.B = g.B;
  r.steps = g.new_tokens > 0 ? g.new_tokens - 1 : 0;
  const int64_t width = g.S + g.new_tokens;
  r.ids.reserve(static_cast<size_t>(g.B * g.new_tokens));
  for (int64_t b = 0; b < g.B; ++b) {
    const auto row = g.ids.begin() + b * width + g.S;
    r.ids.insert(r.ids.end(), row, row + g.new_tokens);
  }
  return r;
}

namespace {

class LmCpuEngine : public ComputeAtSubmit {
 public:
  explicit LmCpuEngine(std::unique_ptr<LmModel> model) : model_(std::move(model)) {}

  bool has_decoder() const override { return false; }
  std::string device() const override { return "cpu"; }
  DType precision() const override { return DType::kF32; }
  Memory memory() const override { return Memory{resident_bytes(), "resident"}; }

  Encoded encode(const Batch& batch, Observer* obs) override {
    check_batch(batch, model_->config().vocab_size, "encode");
    model_->forward(batch, obs);
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

 private:
  std::unique_ptr<LmModel> model_;
};

}  // namespace

std::unique_ptr<Engine> lm_cpu_engine(std::unique_ptr<LmModel> model) {
  return std::make_unique<LmCpuEngine>(std::move(model));
}

}  // namespace moetrace
