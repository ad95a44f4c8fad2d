#include "model/lm/lm_forward.h"

#include "core/error.h"
#include "core/keys.h"
#include "model/engine_io.h"
#include "model/recording_observer.h"

namespace moetrace {

std::map<std::string, Tensor> run_lm_forward(const LmModel& model, const ForwardInputs& in,
                                             int64_t generate) {
  return run_lm_forward(
      model.config(), [&](const Batch& b, Observer* obs) { return model.forward(b, obs); },
      [&](const Batch& b, int64_t n, Observer* obs) { return model.generate(b, n, obs); }, in,
      generate);
}

std::map<std::string, Tensor> run_lm_forward(const LmConfig& config, const LmForwardFn& forward,
                                             const LmGenerateFn& generate_fn,
                                             const ForwardInputs& in, int64_t generate) {
  if (in.T > 0)
    fail(
        "decoder_input_ids: a decoder-only language model takes input_ids and attention_mask only");
  std::map<std::string, Tensor> out;
  RecordingObserver rec([](std::string_view k) { return k.rfind("lm.", 0) == 0; });
  out["logits"] = forward(in.batch, &rec);
  const std::vector<int> blocks = config.sparse_layers();
  for (size_t k = 0; k < blocks.size(); ++k) {
    const std::string p = "router." + std::to_string(k) + ".";
    auto last = [&](std::string_view field) {
      return Tensor::from_view(rec.last(lm_key(false, blocks[k], field)).view());
    };
    out[p + "router_logits"] = last(keys::kRouterLogits);
    out[p + "topk_ids"] = last(keys::kExpert);
    out[p + "topk_weights"] = last(keys::kGate);
    out[p + "router_input"] = last(keys::kHidden);
  }
  if (generate > 0) {
    RecordingObserver grec([](std::string_view k) { return k.rfind("gen.", 0) == 0; });
    const LmGenerateResult g = generate_fn(in.batch, generate, &grec);
    Tensor ids(DType::kI32, {g.B, g.S + g.new_tokens});
    std::copy(g.ids.begin(), g.ids.end(), ids.data<int32_t>());
    out["generated_ids"] = std::move(ids);
    Tensor pos(DType::kI64, {g.B, g.S + g.new_tokens - 1});
    std::copy(g.positions.begin(), g.positions.end(), pos.data<int64_t>());
    out["generate_position_ids"] = std::move(pos);
    if (generate > 1) {  // the N - 1 cached steps, each [B, 1, ...], stacked into [B, N - 1, ...]
      for (size_t k = 0; k < blocks.size(); ++k) {
        const std::string p = "generate_router." + std::to_string(k) + ".";
        auto steps = [&](std::string_view field) {
          return stack_steps(grec.all(lm_key(true, blocks[k], field)));
        };
        out[p + "router_logits"] = steps(keys::kRouterLogits);
        out[p + "topk_ids"] = steps(keys::kExpert);
        out[p + "topk_weights"] = steps(keys::kGate);
        out[p + "router_input"] = steps(keys::kHidden);
      }
    }
  }
  return out;
}

}  // namespace moetrace
