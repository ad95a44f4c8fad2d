// The collection pipeline's batch computed at once, through an engine's encode() and generate():
// the CPU engine's every batch, the GPU engine's batches with generation.
#pragma once

#include <deque>
#include <functional>
#include <memory>

#include "model/engine.h"

namespace moetrace {

// Runs the encoder (and, with max_new_tokens > 0, greedy generation, min_new_tokens 0) on `batch`
// and keeps what `request` wants: encoder keys as offered, decoder keys stacked over the steps
// (model/engine_io.h). The batch owns its tensors; its ticket is left 0.
std::unique_ptr<CapturedBatch> capture_now(Engine& engine, const Batch& batch,
                                           const Observer& request, int64_t max_new_tokens);

// The same assembly around any computation of the batch: `run` offers its keys to the observer it
// is given (which keeps what `request` wants) and returns the generation's ids (steps 0: none).
using CaptureRun = std::function<GenerateResult(Observer*)>;
std::unique_ptr<CapturedBatch> capture_with(const Batch& batch, const Observer& request,
                                            const CaptureRun& run);

// The collection pipeline of an engine that computes each batch at submit() (capture_now) and
// hands it back at poll(): the CPU engines (Switch and the language models).
class ComputeAtSubmit : public Engine {
 public:
  uint64_t submit(const Batch& batch, const Observer& request, int64_t max_new_tokens) override;
  std::unique_ptr<CapturedBatch> poll(bool wait) override;
  int in_flight() const override { return static_cast<int>(done_.size()); }
  int slots() const override { return 1; }

 protected:
  // One batch of the pipeline; capture_now(*this, ...) unless an engine computes it otherwise.
  virtual std::unique_ptr<CapturedBatch> capture(const Batch& batch, const Observer& request,
                                                 int64_t max_new_tokens) {
    return capture_now(*this, batch, request, max_new_tokens);
  }

 private:
  std::deque<std::unique_ptr<CapturedBatch>> done_;
  uint64_t next_ticket_ = 0;
};

}  // namespace moetrace
