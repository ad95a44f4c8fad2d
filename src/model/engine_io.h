// What both engines (the CPU SwitchModel behind engine/engine.h, the GPU CudaSwitchModel) take and
// hand back besides a Batch: the encoder output that decode()/generate() continue from, the
// batches of the collection pipeline, and the one check of a batch.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "core/tensor.h"
#include "model/observer.h"
#include "model/switch_model.h"

namespace moetrace {

// The encoder output of one batch, as decode() and generate() take it. `output` is always on the
// host; an engine that still holds it where it was computed (the GPU, for its latest encode() of
// the same batch) uses that copy instead of uploading `output` again.
struct Encoded {
  Tensor output;    // [B,S,d] f32
  uint64_t id = 0;  // which encode() of the engine made it; 0 = none (e.g. another engine's)
};

// One batch handed back by an engine's collection pipeline (Engine::submit/poll), in submit order.
// Encoder keys are [B,S,...]; decoder keys (with generation) are [B,steps,...]: step t of sequence
// b is row b*steps + t, as the CPU engine's per-step [B,1,...] tensors stacked along dim 1. The
// views stay valid until this object is destroyed (for the GPU pipeline that returns its slot).
class CapturedBatch {
 public:
  virtual ~CapturedBatch() = default;
  CapturedBatch() = default;
  CapturedBatch(const CapturedBatch&) = delete;
  CapturedBatch& operator=(const CapturedBatch&) = delete;

  uint64_t ticket = 0;  // submit() order, from 0
  int64_t B = 0, S = 0;
  std::vector<std::pair<std::string, TensorView>> tensors;  // in block order
  GenerateResult generated;  // with generation: [B, steps+1] ids; else steps == 0

  const TensorView* find(std::string_view key) const {
    for (const auto& [name, view] : tensors)
      if (name == key) return &view;
    return nullptr;
  }
};

// The request of the collection pipeline (Engine::submit): the keys wanted, each with the dtype to
// hand it back in (nullopt: the engine's own). As a request it is only asked; observe() keeps
// nothing.
class KeyRequest : public Observer {
 public:
  void add(std::string key, std::optional<DType> dtype = std::nullopt) {
    keys_[std::move(key)] = dtype;
  }
  bool wants(std::string_view key) const override { return keys_.find(key) != keys_.end(); }
  std::optional<DType> preferred_dtype(std::string_view key) const override {
    const auto it = keys_.find(key);
    return it == keys_.end() ? std::nullopt : it->second;
  }
  void observe(std::string_view, const TensorView&) override {}

 private:
  std::map<std::string, std::optional<DType>, std::less<>> keys_;
};

// A malformed batch as one Error naming what is wrong (`what` says who asks, e.g. "encode"):
// B, S >= 1, B·S ids and mask values, ids in [0, vocab_size).
void check_batch(const Batch& batch, int64_t vocab_size, std::string_view what);
// The encoder output a decoder call continues from: F32 [B, S, d_model] of this batch.
void check_encoded(const Encoded& enc, const Batch& batch, int64_t d_model, std::string_view what);
// Teacher-forced decoder ids: B·T of them, T >= 1, each in [0, vocab_size).
void check_decoder_ids(const std::vector<int32_t>& dec_ids, int64_t B, int64_t T,
                       int64_t vocab_size, std::string_view what);

// Per-step [B,1,...] tensors (a decoder key during generation) stacked into [B,steps,...].
Tensor stack_steps(const std::vector<Tensor>& steps);

// How collect batches, per engine (docs/PERFORMANCE.md "Batching"). The budget when --batch-tokens
// is 0: batch size × padded length. The overhead of one batch, in tokens of compute: on the GPU the
// fixed cost of a batch (launches, a smaller batch's lower efficiency) measured on an H100 as
// 2.25 ms at 0.54 µs per token (32×256 against 128×256 tokens), about 4,000 tokens; the CPU engine's
// cost is nearly proportional to its tokens.
constexpr int64_t kDefaultBatchTokensCpu = 8192;
constexpr int64_t kDefaultBatchTokensCuda = 32768;
constexpr int64_t kBatchOverheadTokensCpu = 256;
constexpr int64_t kBatchOverheadTokensCuda = 4096;
// A batch's budget and the cost of one more batch (length_batches).
struct BatchBudget {
  int64_t tokens = kDefaultBatchTokensCpu;
  int64_t overhead_tokens = kBatchOverheadTokensCpu;
};

// Length bucketing (collect's batches, its audit's, the benchmarks'): indices of `lengths` in
// batches of at most budget.tokens rows × longest length, longest first. Of the partitions of the
// length-sorted samples into such runs, the one of least modelled cost Σ (overhead_tokens + rows ×
// longest): overhead_tokens is what one more batch costs beyond its tokens, so that padding is
// traded against batch count; 0 puts only equal lengths together (no padding). Padding never
// changes routing: capacity is per sequence and pads come last.
std::vector<std::vector<size_t>> length_batches(const std::vector<int64_t>& lengths,
                                                const BatchBudget& budget);

}  // namespace moetrace
