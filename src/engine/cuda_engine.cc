// The GPU engine behind the Engine interface: CudaSwitchModel (model/cuda/cuda_switch_model.h).
// Compiled only when the build has the CUDA backend (src/engine/CMakeLists.txt).
#include <deque>

#include "core/error.h"
#include "engine/backends.h"
#include "model/capture_now.h"
#include "model/cuda/cuda_lm_model.h"
#include "model/cuda/cuda_switch_model.h"
#include "model/lm/lm_engine.h"

namespace moetrace {

namespace {

class CudaEngine : public Engine {
 public:
  CudaEngine(std::unique_ptr<CudaSwitchModel> model, DeviceChoice device)
      : model_(std::move(model)), device_(device) {}

  bool has_decoder() const override { return model_->has_decoder(); }
  std::string device() const override { return device_.name(); }
  DType precision() const override { return model_->precision(); }
  Memory memory() const override { return Memory{model_->device_bytes(), "of GPU memory"}; }

  Encoded encode(const Batch& batch, Observer* obs) override { return model_->encode(batch, obs); }
  Tensor decode(const Encoded& enc, const Batch& batch, const std::vector<int32_t>& dec_ids,
                int64_t T, Observer* obs) override {
    return model_->decode(enc, batch, dec_ids, T, obs);
  }
  GenerateResult generate(const Encoded& enc, const Batch& batch, int64_t max_new_tokens,
                          int64_t min_new_tokens, Observer* obs) override {
    return model_->generate(enc, batch, max_new_tokens, min_new_tokens, obs);
  }

  // Encoder-only batches go through the asynchronous pipeline; a batch with generation runs at
  // once (after the pipeline's batches, so that poll() keeps submit order).
  uint64_t submit(const Batch& batch, const Observer& request, int64_t max_new_tokens) override {
    if (max_new_tokens == 0) {
      model_->submit(batch, request);
    } else {
      while (auto r = model_->poll(true)) ready_.push_back(std::move(r));
      ready_.push_back(capture_now(*this, batch, request, max_new_tokens));
    }
    return submitted_++;
  }
  std::unique_ptr<CapturedBatch> poll(bool wait) override {
    std::unique_ptr<CapturedBatch> r;
    if (!ready_.empty()) {
      r = std::move(ready_.front());
      ready_.pop_front();
    } else {
      r = model_->poll(wait);
    }
    if (r) r->ticket = polled_++;
    return r;
  }
  int in_flight() const override { return static_cast<int>(ready_.size()) + model_->in_flight(); }
  int slots() const override { return model_->slots(); }

 private:
  std::unique_ptr<CudaSwitchModel> model_;
  DeviceChoice device_;
  std::deque<std::unique_ptr<CapturedBatch>> ready_;  // computed at once, not yet polled
  uint64_t submitted_ = 0, polled_ = 0;
};

// A decoder-only language model on the GPU (CudaLmModel): each batch computed at submit(), its
// prompt pass through prefill() (no LM head); the adapter's rules are model/lm/lm_engine.h's.
class CudaLmEngine : public LmEngine<CudaLmModel> {
 public:
  CudaLmEngine(std::unique_ptr<CudaLmModel> model, DeviceChoice device)
      : LmEngine(std::move(model), device.name(),
                 [](CudaLmModel& m, const Batch& b, Observer* obs) { m.prefill(b, obs); }) {}
  DType precision() const override { return model().precision(); }
  Memory memory() const override { return Memory{model().device_bytes(), "of GPU memory"}; }
};

}  // namespace

namespace {
CudaOptions lm_cuda_options(const EngineOptions& options) {
  CudaOptions co;
  co.device = options.device.index;
  co.precision = options.precision;
  return co;
}
}  // namespace

std::unique_ptr<Engine> make_cuda_lm_engine(const EngineOptions& options,
                                            const std::filesystem::path& dir) {
  return std::make_unique<CudaLmEngine>(CudaLmModel::load(dir, lm_cuda_options(options)),
                                        options.device);
}

std::map<std::string, Tensor> cuda_lm_forward(const EngineOptions& options,
                                              const std::filesystem::path& dir,
                                              const ForwardInputs& in, int64_t generate) {
  const auto model = CudaLmModel::load(dir, lm_cuda_options(options));
  return run_lm_forward(*model, in, generate);
}

std::unique_ptr<Engine> make_cuda_engine(const EngineOptions& options, const SwitchConfig& config,
                                         std::shared_ptr<TensorSource> weights) {
  CudaOptions co;
  co.device = options.device.index;
  co.precision = options.precision;
  co.fp32.routing = options.fp32_routing;
  co.fp32.attention_pairs = options.attention_pairs;
  return std::make_unique<CudaEngine>(
      CudaSwitchModel::from_source(config, std::move(weights), options.load, co), options.device);
}

}  // namespace moetrace
