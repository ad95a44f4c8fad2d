// The fidelity audit of a trace store (`collect --audit FRACTION`, docs/TRACE_FORMAT.md,
// "fidelity"): a deterministic subset of the store's real samples is read back (token ids, experts,
// router logits), re-run through a float32 encoder, and per encoder MoE layer the stored top-1
// choice is compared with the reference's and the stored router logits with its logits. The
// result is the manifest's "fidelity" object.
//
// Decoupled from collect: the audit knows the store (through the trace reader) and a callable
// that encodes a Batch at fp32 offering the observation keys to an Observer; the caller builds
// that from whichever engine, after freeing its own.
#pragma once

#include <cstdint>
#include <filesystem>
#include <functional>
#include <string>
#include <vector>

#include "model/engine_io.h"
#include "model/observer.h"
#include "model/switch_model.h"
#include "trace/store.h"

namespace moetrace {

// An fp32 encoder pass over batch that offers at least enc.{i}.router_logits [B,S,E] and
// enc.{i}.expert [B,S] of every encoder MoE layer of the store to the observer.
using AuditEncode = std::function<void(const Batch& batch, Observer* observer)>;

struct AuditOptions {
  double fraction = 0.01;   // share of the store's samples to re-run, in (0, 1]
  int64_t min_samples = 1;  // at least this many (collect: one batch, batch_tokens/max_length)
  BatchBudget batches;      // the re-run's batches (length_batches)
  int32_t pad_token_id = 0;
  std::string precision;  // the stored routing's precision (the engine's --precision)
  // Non-empty: nothing is re-run, the object records "skipped" with this reason (the stored
  // routing already is fp32: the CPU engine, --precision fp32).
  std::string skip_reason;
};

// The sample positions an audit of a store of n samples starts from: k = min(n, max(ceil(fraction
// · n), min_samples)) positions floor(j · n / k), j < k, spread evenly over the store (datasets,
// shards, lengths). Deterministic: the same store gives the same positions.
std::vector<int64_t> audit_positions(int64_t n, double fraction, int64_t min_samples);

// Audits the store in dir: from each position the first real sample not chosen yet (synthetic
// ones have no model computation to compare), re-run with encode, batched by length within
// options.batches. Compares every token of the samples (dropped ones too: their expert is the
// router's choice) per encoder MoE layer: top1_agree counts stored expert == reference expert,
// max_logit_error is max |stored logit - reference logit|, the stored logit as the store holds
// it (F16/BF16 rounding included). Error when the reference's tensors do not fit the store.
Fidelity run_audit(const std::filesystem::path& dir, const AuditOptions& options,
                   const AuditEncode& encode);

// collect's step after the store is complete: records a skipped audit when options.skip_reason is
// set, or when the store holds no real sample; else calls make_encode() (which loads the fp32
// engine; the caller has freed its own before) and run_audit(). Writes the result into the
// manifest (set_store_fidelity) and logs one line.
Fidelity audit_store(const std::filesystem::path& dir, const AuditOptions& options,
                     const std::function<AuditEncode()>& make_encode);

// --audit's value: a fraction in [0, 1] written as a plain number; Error in one line otherwise.
double parse_audit_fraction(const std::string& value);

}  // namespace moetrace
