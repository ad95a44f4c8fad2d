// The Switch encoder-decoder on one CUDA GPU: the twin of SwitchModel (model/switch_model.h), with
// the same observation keys, plus an asynchronous capture pipeline for the encoder's traces.
//
// Precision: weights and GEMM operands in bf16 (default), fp16 or fp32, always with fp32
// accumulation. The residual stream, RMS norms, softmaxes and the whole router stay float32 in
// every mode (the router's logits come from the float32 norm output, never TF32); fp32 mode is the
// parity mode. As transformers does, the argmax and the gate see the probabilities rounded to the
// activation dtype unless CudaOptions::fp32.routing (precision "mixed") keeps them float32.
// Per-sequence expert capacity, top-1 ties and dropped tokens follow SWITCH_SPEC.md exactly.
//
// Observation, one mechanism (model/observer.h): every tensor of core/keys.h is offered to an
// Observer only when it wants(key). Where it goes is the pass's business:
//  * encode(batch, obs) and decode(): copied to the host at once (the same keys and shapes as
//    SwitchModel::encode/decode).
//  * generate(): staged in pinned memory on the stream, offered after the step's one
//    synchronization, once per step with shapes [B,1,...].
//  * submit(batch, request) / poll(): the collection pipeline. The request is an Observer too:
//    its wants(key) picks the encoder keys and preferred_dtype(key) their dtype. submit() copies
//    the batch into a pinned slot and enqueues the forward on the compute stream without waiting;
//    the router writes the wanted tensors straight into that slot's device staging area, which a
//    copy stream moves to pinned host memory while the next batch computes. poll() hands back
//    finished batches in submit order as CapturedBatch objects (model/engine_io.h: host views
//    into pinned memory); destroying one returns its slot. No device-wide synchronization, none
//    per layer: the expert plan stays on the device.
//
//      CudaSwitchModel m(...);
//      KeyRequest want;  want.add("enc.1.router_logits", DType::kF16);  ...
//      for (const Batch& b : batches) {
//        if (m.in_flight() == m.slots())
//          consume(m.poll(true));      // consume may hand it to a writer thread
//        m.submit(b, want);
//      }
//      while (auto r = m.poll(true)) consume(std::move(r));
//
//    submit() waits while every slot is held by an unreleased CapturedBatch (another thread is
//    expected to release it) and throws if every slot is in flight (poll first). One thread calls
//    submit/poll/encode; CapturedBatch objects may be released from any thread.
//
// The decoder (loaded unless LoadOptions::encoder_only) continues from an Encoded (encode()'s
// result, or any [B,S,d] float32 encoder output, e.g. the CPU engine's): when it is this engine's
// latest encode() of the same batch, the output still on the device is used; otherwise
// Encoded::output is uploaded. The same shape as the CPU engine behind engine/engine.h.
//  * generate(enc, batch, max_new_tokens, min_new_tokens, observer): greedy generation with exactly
//    SwitchModel::generate's semantics and result (start token, eos masked for the first
//    min_new_tokens steps, finished sequences get pad tokens and are still routed, early stop when
//    all have finished). Keys dec.{i}.input/hidden/router_logits/expert/dropped/gate are offered
//    once per step with shapes [B,1,...], as the CPU engine offers them.
//    A KV cache on the device: each step appends its k, v per block ([B, max_new_tokens, 2*H*d_kv]
//    per block); the cross-attention k, v of every block come from one GEMM over the encoder output
//    per call. One synchronization per step: the step's token ids and the observed tensors (staged
//    in pinned memory) go to the host, which decides on the early stop.
//  * decode(enc, batch, dec_ids, T, observer): the teacher-forced pass, LM logits [B,T,V] float32
//    and keys with [B,T,...] (there, the per-sequence capacity can drop tokens; a generation step
//    sees one token per sequence and never drops one).
// The LM head (tied: the d_model^-0.5 scale folded into the final norm weight) and the argmax run
// on the device; in every precision the LM logits are float32.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <filesystem>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "core/tensor.h"
#include "io/checkpoint.h"
#include "model/config.h"
#include "model/engine_io.h"
#include "model/observer.h"
#include "model/switch_model.h"

namespace moetrace {

// What stays float32 although the GEMM operands are bf16/f16 (in fp32 mode everything is). One
// member per choice, so that a measurement can add the next one (docs/GPU.md, "Precision").
struct Fp32Parts {
  // The routing decision and its scale: top-1 (lowest index on ties) and gate from the float32
  // probabilities, not from the probabilities rounded to the activation dtype.
  bool routing = false;
  // The encoder's self-attention keeps its probabilities (operand of P·V) and its output (operand
  // of the o-projection) as pairs hi + lo of the operand dtype, hi = round(x), lo = round(x - hi):
  // ~22 significant bits in fp16. The fused attention runs P·V twice (hi and lo over the same
  // V) and writes both halves; the o-projection is one GEMM over K = 2·inner against [Wo | Wo].
  // Where the fused attention does not apply (d_kv != 64 or S > 1024) the low half is zero and
  // the numbers are those without pairs. The decoder is unchanged.
  bool attention_pairs = false;
};

struct CudaOptions {
  DType precision = DType::kBF16;  // kBF16, kF16 or kF32 (parity mode)
  int device = 0;
  Fp32Parts fp32{};  // all false: transformers' semantics in every precision
};

// The CudaOptions of a --precision spelling (parse_precision_option): "bf16", "fp16", "fp32", or
// "mixed" = kF16 with Fp32Parts::routing, "faithful" = kF16 with every Fp32Parts choice on (one
// mapping: core/dtype.h precision_mode). Error for anything else.
CudaOptions cuda_options_for_precision(std::string_view precision);

class CudaSwitchModel {
 public:
  // Uploads the encoder weights and, unless load.encoder_only, the decoder's, in
  // options.precision. Throws Error for unsupported configs (router_bias, d_kv·H or d_ff not
  // multiples of 8, more than 256 experts).
  static std::unique_ptr<CudaSwitchModel> from_source(SwitchConfig config,
                                                      std::shared_ptr<TensorSource> source,
                                                      const LoadOptions& load,
                                                      const CudaOptions& options);
  static std::unique_ptr<CudaSwitchModel> load(const std::filesystem::path& dir,
                                               const LoadOptions& load, const CudaOptions& options);
  ~CudaSwitchModel();
  CudaSwitchModel(const CudaSwitchModel&) = delete;
  CudaSwitchModel& operator=(const CudaSwitchModel&) = delete;

  const SwitchConfig& config() const;
  DType precision() const;
  // Bytes of device memory held now (weights + activations + staging).
  size_t device_bytes() const;
  // Seconds the weight upload took.
  double load_seconds() const;

  // Synchronous encoder: enc.output [B,S,d] float32 (also kept on the device for generate()/
  // decode() of the same batch).
  Encoded encode(const Batch& batch, Observer* obs);

  bool has_decoder() const;
  // Greedy generation (see the file comment). max_new_tokens <= 8192.
  GenerateResult generate(const Encoded& enc, const Batch& batch, int64_t max_new_tokens,
                          int64_t min_new_tokens, Observer* obs);
  // Teacher-forced decoder pass over dec_ids [B,T] (T <= 1024); returns LM logits [B,T,V] float32.
  Tensor decode(const Encoded& enc, const Batch& batch, const std::vector<int32_t>& dec_ids,
                int64_t T, Observer* obs);

  // The asynchronous pipeline (see the file comment). `request` is asked at submit() only.
  uint64_t submit(const Batch& batch, const Observer& request);
  std::unique_ptr<CapturedBatch> poll(bool wait);
  int in_flight() const;
  int slots() const;
  void set_slots(int n);  // batches in flight + held (default 3); only while none is

  // Prepares buffers for batches up to B x S (optional; they grow on demand otherwise).
  void reserve(int64_t B, int64_t S);

  struct Impl;

 private:
  explicit CudaSwitchModel(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace moetrace
