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

class LmCpuEngine : public LmEngine<LmModel> {
 public:
  explicit LmCpuEngine(std::unique_ptr<LmModel> model)
      : LmEngine(std::move(model), "cpu",
                 [](LmModel& m, const Batch& b, Observer* obs) { m.forward(b, obs); }) {}
  DType precision() const override { return DType::kF32; }
  Memory memory() const override { return Memory{resident_bytes(), "resident"}; }
};

}  // namespace

std::unique_ptr<Engine> lm_cpu_engine(std::unique_ptr<LmModel> model) {
  return std::make_unique<LmCpuEngine>(std::move(model));
}

}  // namespace moetrace
