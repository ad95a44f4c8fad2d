#include "model/capture_now.h"

#include <deque>
#include <map>
#include <string>
#include <vector>

#include "core/error.h"

namespace moetrace {

namespace {

// Copies what the request wants, per key in the order first offered (block order).
class Recorder : public Observer {
 public:
  explicit Recorder(const Observer& request) : request_(request) {}
  bool wants(std::string_view key) const override { return request_.wants(key); }
  void observe(std::string_view key, const TensorView& t) override {
    auto it = steps_.find(key);
    if (it == steps_.end()) {
      order_.emplace_back(key);
      it = steps_.emplace(std::string(key), std::vector<Tensor>{}).first;
    }
    it->second.push_back(Tensor::from_view(t));
  }
  const std::vector<std::string>& order() const { return order_; }
  std::vector<Tensor>& steps(const std::string& key) { return steps_.at(key); }

 private:
  const Observer& request_;
  std::vector<std::string> order_;
  std::map<std::string, std::vector<Tensor>, std::less<>> steps_;
};

class OwnedBatch : public CapturedBatch {
 public:
  std::deque<Tensor> owned;  // what `tensors` views (a deque: views stay valid as it grows)
};

}  // namespace

std::unique_ptr<CapturedBatch> capture_with(const Batch& batch, const Observer& request,
                                            const CaptureRun& run) {
  Recorder rec(request);
  auto out = std::make_unique<OwnedBatch>();
  out->B = batch.B;
  out->S = batch.S;
  out->generated = run(&rec);
  for (const std::string& key : rec.order()) {
    std::vector<Tensor>& steps = rec.steps(key);
    out->owned.push_back(steps.size() == 1 ? std::move(steps.front()) : stack_steps(steps));
    out->tensors.emplace_back(key, out->owned.back().view());
  }
  return out;
}

std::unique_ptr<CapturedBatch> capture_now(Engine& engine, const Batch& batch,
                                           const Observer& request, int64_t max_new_tokens) {
  return capture_with(batch, request, [&](Observer* rec) {
    const Encoded enc = engine.encode(batch, rec);
    return max_new_tokens > 0 ? engine.generate(enc, batch, max_new_tokens, 0, rec)
                              : GenerateResult{};
  });
}

uint64_t ComputeAtSubmit::submit(const Batch& batch, const Observer& request,
                                 int64_t max_new_tokens) {
  if (!done_.empty())
    fail("engine: submit() with a batch not yet polled (it computes at submit); poll() first");
  done_.push_back(capture(batch, request, max_new_tokens));
  done_.back()->ticket = next_ticket_;
  return next_ticket_++;
}

std::unique_ptr<CapturedBatch> ComputeAtSubmit::poll(bool) {
  if (done_.empty()) return nullptr;
  std::unique_ptr<CapturedBatch> r = std::move(done_.front());
  done_.pop_front();
  return r;
}

}  // namespace moetrace
