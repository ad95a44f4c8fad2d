#include "model/lm/lm_forward.h"

#include "core/error.h"
#include "core/keys.h"
#include "model/recording_observer.h"

namespace moetrace {

std::map<std::string, Tensor> run_lm_forward(const LmModel& model, const ForwardInputs& in,
                                             int64_t generate) {
  if (in.T > 0)
    fail(
        "decoder_input_ids: a decoder-only language model takes input_ids and attention_mask only");
  std::map<std::string, Tensor> out;
  RecordingObserver rec([](std::string_view k) { return k.rfind("lm.", 0) == 0; });
  out["logits"] = model.forward(in.batch, &rec);
  const std::vector<int> blocks = model.config().sparse_layers();
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
    const LmGenerateResult g = model.generate(in.batch, generate, nullptr);
    Tensor ids(DType::kI32, {g.B, g.S + g.new_tokens});
    std::copy(g.ids.begin(), g.ids.end(), ids.data<int32_t>());
    out["generated_ids"] = std::move(ids);
  }
  return out;
}

}  // namespace moetrace
