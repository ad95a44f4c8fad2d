// One interface for every engine: the CPU SwitchModel (model/cpu_engine.h) and the GPU
// CudaSwitchModel (model/cuda/cuda_switch_model.h), and the decoder-only language models' LmModel
// and CudaLmModel (model/lm), behind engine/engine.h's make_engine() and make_lm_engine(), the one
// place that knows which engines a build has.
//
//   Encoded enc = engine.encode(batch, &observer);            // keys of core/keys.h
//   GenerateResult g = engine.generate(enc, batch, 32, 0, &observer);
//
// The collection pipeline, the one result path of `collect` on every device: submit() a batch
// with a request (an Observer: what it wants, in which dtype), poll() the batches back in submit
// order. The GPU engine runs them asynchronously, several in flight; the CPU engine runs each at
// submit() and poll() hands it back.
//
//   for (const Batch& b : batches) {
//     if (engine.in_flight() == engine.slots()) consume(engine.poll(true));
//     engine.submit(b, request, max_new_tokens);
//   }
//   while (auto r = engine.poll(true)) consume(std::move(r));
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "model/config.h"
#include "model/engine_io.h"
#include "model/observer.h"
#include "model/switch_model.h"

namespace moetrace {

class Engine {
 public:
  virtual ~Engine() = default;

  // Switch has an encoder and a decoder; a decoder-only language model (model/lm) has neither
  // decoder pass (has_decoder() is false, decode() an error): its encode() is the prompt pass
  // (lm.* keys) and generate() continues it greedily (gen.* keys).
  virtual bool has_decoder() const = 0;
  virtual std::string device() const = 0;  // "cpu", "cuda:0", ...
  // The activations' dtype: F32 on the CPU; BF16, F16 or F32 on the GPU (the router is F32 in
  // every precision).
  virtual DType precision() const = 0;
  // What the loaded model occupies, for the log: bytes of GPU memory, or of the process's
  // resident memory (VmRSS) on the CPU.
  struct Memory {
    uint64_t bytes = 0;
    const char* what = "resident";  // "of GPU memory" | "resident"
  };
  virtual Memory memory() const = 0;

  // The encoder over a padded batch; enc.output [B,S,d] f32. Error for a malformed batch.
  virtual Encoded encode(const Batch& batch, Observer* obs) = 0;
  // The teacher-forced decoder over dec_ids [B,T]; LM logits [B,T,V] f32.
  virtual Tensor decode(const Encoded& enc, const Batch& batch, const std::vector<int32_t>& dec_ids,
                        int64_t T, Observer* obs) = 0;
  // Greedy generation from the decoder start token (SwitchModel::generate's semantics); decoder
  // keys are offered once per step with shapes [B,1,...].
  virtual GenerateResult generate(const Encoded& enc, const Batch& batch, int64_t max_new_tokens,
                                  int64_t min_new_tokens, Observer* obs) = 0;

  // The collection pipeline (see the file comment). With max_new_tokens > 0 the batch is also
  // generated from (min_new_tokens 0) and its decoder keys come back as [B,steps,...]. The
  // request is asked during submit() only. Returns the batch's ticket (submit order from 0).
  virtual uint64_t submit(const Batch& batch, const Observer& request, int64_t max_new_tokens) = 0;
  // The oldest submitted batch when it is finished (wait: once it is), else nullptr; nullptr
  // when none is in flight.
  virtual std::unique_ptr<CapturedBatch> poll(bool wait) = 0;
  virtual int in_flight() const = 0;
  virtual int slots() const = 0;
};

}  // namespace moetrace
