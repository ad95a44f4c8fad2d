#include "model/cuda/hf_init_weights.h"

#include <cmath>
#include <map>
#include <string>

namespace moetrace {
namespace {

// The base source with some tensors replaced by rescaled copies.
class RescaledSource : public TensorSource {
 public:
  explicit RescaledSource(std::shared_ptr<TensorSource> base) : base_(std::move(base)) {}
  std::vector<std::string> names() const override { return base_->names(); }
  const CheckpointTensor* find(const std::string& name) const override {
    auto it = refs_.find(name);
    return it != refs_.end() ? &it->second : base_->find(name);
  }
  std::vector<std::filesystem::path> files() const override { return base_->files(); }
  std::string format() const override { return base_->format() + ", HF init scales"; }

  void rescale(const std::string& name, float factor) {
    const CheckpointTensor* t = base_->find(name);
    if (t == nullptr) return;
    const size_t n = static_cast<size_t>(t->view.numel());
    std::vector<float> f(n);
    convert_to_f32(t->view.dtype, t->view.data, f.data(), n);
    for (auto& v : f) v *= factor;
    Tensor out(t->view.dtype, t->view.shape);
    convert_from_f32(f.data(), t->view.dtype, out.raw(), n);
    refs_[name] = CheckpointTensor{name, out.view(), t->file};
    owned_[name] = std::move(out);
  }

 private:
  std::shared_ptr<TensorSource> base_;
  std::map<std::string, Tensor> owned_;
  std::map<std::string, CheckpointTensor> refs_;
};

}  // namespace

std::shared_ptr<TensorSource> make_hf_init_random_weights(const SwitchConfig& c,
                                                          const RandomWeightOptions& o) {
  auto src = std::make_shared<RescaledSource>(make_random_weights(c, o));
  const float q_factor = 1.0f / std::sqrt(static_cast<float>(c.d_kv));
  const float bias_factor = 1.0f / std::sqrt(static_cast<float>(c.d_model));
  for (const char* stack : {"encoder", "decoder"}) {
    const int64_t n = std::string(stack) == "encoder" ? c.num_layers : c.num_decoder_layers;
    for (int64_t i = 0; i < n; ++i) {
      const std::string p = std::string(stack) + ".block." + std::to_string(i) + ".layer.";
      src->rescale(p + "0.SelfAttention.q.weight", q_factor);
      src->rescale(p + "1.EncDecAttention.q.weight", q_factor);
    }
    src->rescale(
        std::string(stack) + ".block.0.layer.0.SelfAttention.relative_attention_bias.weight",
        bias_factor);
  }
  return src;
}

}  // namespace moetrace
