#include "model/cpu_engine.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>

#include "core/error.h"
#include "model/capture_now.h"

namespace moetrace {

namespace {

class CpuEngine : public ComputeAtSubmit {
 public:
  CpuEngine(std::shared_ptr<const SwitchModel> model) : model_(std::move(model)) {}

  const SwitchConfig& config() const { return model_->config(); }
  bool has_decoder() const override { return model_->weights().has_decoder; }
  std::string device() const override { return "cpu"; }
  DType precision() const override { return DType::kF32; }
  Memory memory() const override { return Memory{resident_bytes(), "resident"}; }

  Encoded encode(const Batch& batch, Observer* obs) override {
    check_batch(batch, config().vocab_size, "encode");
    return Encoded{model_->encode(batch, obs), 0};
  }
  Tensor decode(const Encoded& enc, const Batch& batch, const std::vector<int32_t>& dec_ids,
                int64_t T, Observer* obs) override {
    check_decoder_call(enc, batch, "decode");
    check_decoder_ids(dec_ids, batch.B, T, config().vocab_size, "decode");
    return model_->decode(enc.output, batch, dec_ids, T, obs);
  }
  GenerateResult generate(const Encoded& enc, const Batch& batch, int64_t max_new_tokens,
                          int64_t min_new_tokens, Observer* obs) override {
    check_decoder_call(enc, batch, "generate");
    return model_->generate(enc.output, batch, max_new_tokens, min_new_tokens, obs);
  }

 private:
  void check_decoder_call(const Encoded& enc, const Batch& batch, const char* what) const {
    if (!has_decoder())
      fail(what, ": the model was loaded encoder-only; the decoder is not available");
    check_batch(batch, config().vocab_size, what);
    check_encoded(enc, batch, config().d_model, what);
  }

  std::shared_ptr<const SwitchModel> model_;
};

}  // namespace

// Resident memory of this process (VmRSS), bytes; 0 where /proc is not there.
uint64_t resident_bytes() {
  uint64_t kb = 0;
  if (FILE* f = std::fopen("/proc/self/status", "r")) {
    char line[256];
    while (std::fgets(line, sizeof line, f)) {
      if (std::strncmp(line, "VmRSS:", 6) == 0) {
        kb = std::strtoull(line + 6, nullptr, 10);
        break;
      }
    }
    std::fclose(f);
  }
  return kb * 1024;
}

std::unique_ptr<Engine> cpu_engine(std::unique_ptr<SwitchModel> model) {
  return std::make_unique<CpuEngine>(std::shared_ptr<const SwitchModel>(std::move(model)));
}

std::unique_ptr<Engine> cpu_engine(const SwitchModel& model) {
  // Borrowed: the caller keeps the model alive.
  return std::make_unique<CpuEngine>(std::shared_ptr<const SwitchModel>(&model, [](auto*) {}));
}

}  // namespace moetrace
