// The stages of `moetrace collect` (run_collect in collect.cc strings them together):
//
//   plan      plan_samples(): which samples, real and synthetic, in store order
//   tokenize  TokenizeStage: windows of whole shards' samples, tokenized on their own thread
//   batch     window_batches(): a window's real samples as length-bucketed, padded batches
//   engine    EngineStage: batches through Engine::submit/poll (model/engine.h), every device
//   capture   capture_samples(): a captured batch's rows into per-sample data
//   store     StoreStage: finished windows into the TraceWriter, on its own thread
//
// run_windows() is the loop over them. Internal to src/collect.
#pragma once

#include <algorithm>
#include <atomic>
#include <csignal>
#include <cstdint>
#include <deque>
#include <exception>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "collect/collect.h"
#include "collect/handoff.h"
#include "collect/model_source.h"
#include "collect/progress.h"
#include "collect/synthetic.h"
#include "core/keys.h"
#include "data/plan.h"
#include "model/engine.h"
#include "text/text_tokenizer.h"
#include "trace/store.h"

namespace moetrace::pipeline {

// ---- plan: which samples, in store order ---------------------------------------------------------

// One sample of the run, in store order.
struct WorkItem {
  int64_t index = 0;  // global sample index
  bool synthetic = false;
  int64_t synthetic_index = 0;
  std::string sample_id, dataset;
  int64_t row = 0;
  const std::string* text = nullptr;  // real samples: the prompt (owned by Plan::rows)
  std::vector<int32_t> ids;           // filled by the tokenizer stage
};

struct Plan {
  std::vector<PlannedSample> rows;  // the real samples' texts
  std::vector<WorkItem> items;      // every sample of the run (this rank's after take_part)
  std::string datasets_setting;     // what the manifest records as "datasets"
};

// The samples of --traces: real ones from the sampling plan and/or synthetic ones, interleaved by
// --mode. When the datasets hold fewer real samples than asked for, the run collects those.
Plan plan_samples(const CollectOptions& o, const ModelChoice& mc, int64_t L);

// ---- tokenize: windows of samples, on their own thread -------------------------------------------

// Tokenizes window after window (at most two ahead) while the engine runs. A window is the samples
// of --batch-window / --samples-per-shard whole shards, the same for every run of a store, so
// batches (and with them the float rounding of every logit) depend only on the plan: a resumed run
// or a rank of a data-parallel run (whose part starts at a window boundary) recomputes exactly the
// batches of one uninterrupted process. With the GPU engine, each window is tokenized by several
// threads (one would not keep up).
class TokenizeStage {
 public:
  using Span = std::pair<size_t, size_t>;  // [begin, end) of the items
  TokenizeStage(std::vector<WorkItem>& items, const TextTokenizer& tok, int max_length,
                size_t first_window, size_t per_window, unsigned threads)
      : items_(items), tok_(tok), max_length_(max_length), threads_(threads) {
    thread_ = std::thread([this, first_window, per_window] {
      try {
        for (size_t i = first_window; i < items_.size(); i += per_window) {
          const size_t end = std::min(items_.size(), i + per_window);
          tokenize(i, end);
          if (!ready_.push({i, end})) break;
        }
      } catch (...) {
        error_ = std::current_exception();
      }
      ready_.finish();
    });
  }
  ~TokenizeStage() { stop(); }
  // The next tokenized window; nullopt when all are done or the tokenizer failed (rethrow()).
  std::optional<Span> next() { return ready_.pop(); }
  void stop() {
    ready_.stop();
    if (thread_.joinable()) thread_.join();
  }
  void rethrow() const {
    if (error_) std::rethrow_exception(error_);
  }

 private:
  void tokenize(size_t begin, size_t end) {
    std::vector<std::exception_ptr> errors(threads_);
    auto run = [&](size_t t) {
      try {
        for (size_t k = begin + t; k < end; k += threads_) {
          WorkItem& w = items_[k];
          if (w.text != nullptr) w.ids = tok_.encode(*w.text, max_length_);
        }
      } catch (...) {
        errors[t] = std::current_exception();
      }
    };
    std::vector<std::thread> pool;
    for (size_t t = 1; t < threads_; ++t) pool.emplace_back(run, t);
    run(0);
    for (auto& th : pool) th.join();
    for (auto& e : errors) {
      if (e) std::rethrow_exception(e);
    }
  }

  std::vector<WorkItem>& items_;
  const TextTokenizer& tok_;
  int max_length_;
  size_t threads_;
  HandOff<Span> ready_{2};
  std::exception_ptr error_;
  std::thread thread_;
};

// ---- batch: a window's real samples as padded engine batches ------------------------------------

// Owned per-sample traces between the engine and the writer (store order is restored per window).
// Logits and hidden states keep the engine's dtype (F32 from the CPU engine, F16/BF16 from the GPU
// pipeline) so that the writer copies them byte for byte when the store uses the same dtype.
struct LayerData {
  std::vector<uint8_t> logits, hidden;  // logits: empty with --logits topk:K
  DType logits_dtype = DType::kF32, hidden_dtype = DType::kF32;
  std::vector<float> gate;
  std::vector<int32_t> expert;
  std::vector<uint8_t> dropped;
  // --logits topk:K (router_topk() of the captured logits): [S, K] values and ids, [S] lse.
  std::vector<float> topk_values, lse;
  std::vector<int32_t> topk_ids;
};
struct SampleData {
  std::vector<LayerData> enc, dec;
  std::vector<int32_t> dec_in, dec_out;
};

// A tokenized window: its samples go to the store, in store order, once every batch made of it
// has come back from the engine.
struct Window {
  size_t begin = 0;  // position of items.front() in the run's items
  std::vector<WorkItem> items;
  std::vector<SampleData> data;
  size_t outstanding = 0;  // batches submitted to the engine, not yet captured
  bool submitted = false;  // every batch of the window has been submitted
};

// One engine batch: the window positions of its samples, padded to the longest.
struct WindowBatch {
  std::vector<size_t> members;
  Batch batch;
};

// The window's real samples in length-bucketed batches, run in the order of their first sample,
// not longest first: each batch's numbers do not depend on when it runs, and the samples complete
// roughly in store order, so that an interrupted run commits most of what it computed.
// same_length: only samples of one length share a batch (no padding): a decoder-only language
// model's greedy generation continues from the batch's last column (model/lm/lm_engine.h).
std::vector<WindowBatch> window_batches(const Window& win, const BatchBudget& budget, int32_t pad,
                                        bool same_length = false);

// ---- capture: what the store needs of a batch, per sample ----------------------------------------

// The layers to keep and how: the request the engine is given, and the slicing of its batches.
struct CaptureLayout {
  std::vector<int> enc_layers, dec_layers;  // block indices of the sparse layers
  // Where their keys come from: Switch's enc./dec., a language model's lm. (prompt) / gen. steps.
  keys::Stack prompt_stack = keys::Stack::kEncoder, gen_stack = keys::Stack::kDecoder;
  int64_t top_k = 1;    // experts per token: expert and gate are [B,S,top_k]
  bool dropped = true;  // the model has expert capacity (Switch): `dropped` is captured
  int64_t E = 0, d = 0;
  bool hidden = false;
  int32_t eos = 1;
  // --logits topk:K: the top-K are computed here, on the host, from the engine's F32 logits (the
  // same code for every engine; a GPU-side top-K would move fewer bytes over PCIe).
  int logits_topk = 0;

  // The dtype the router logits are captured in: F16 logits may cross the GPU's bus as they are;
  // other store dtypes, and the top-K, are made from exact F32.
  DType captured_logits(DType store_logits) const {
    return store_logits == DType::kF16 && logits_topk == 0 ? DType::kF16 : DType::kF32;
  }
  // Every stored field of every layer.
  KeyRequest request(DType store_logits, std::optional<DType> store_hidden) const {
    KeyRequest r;
    auto add = [&](keys::Stack s, int block) {
      r.add(keys::tensor(s, block, keys::kRouterLogits), captured_logits(store_logits));
      for (std::string_view f : {keys::kExpert, keys::kGate}) r.add(keys::tensor(s, block, f));
      if (dropped) r.add(keys::tensor(s, block, keys::kDropped));
      if (store_hidden) r.add(keys::tensor(s, block, keys::kHidden), *store_hidden);
    };
    for (int i : enc_layers) add(prompt_stack, i);
    for (int i : dec_layers) add(gen_stack, i);
    return r;
  }
};

// What an automatic window on CUDA aims at: 4,096 samples give the length buckets enough texts of
// each length that real text pads 12% instead of 24.5% (docs/PERFORMANCE.md, 2026-12-07), while a
// window's captured data, which waits in host memory until its last batch is back, stays bounded.
constexpr int64_t kCudaWindowSamples = 4096;
constexpr int64_t kCudaWindowBytes = int64_t{2} << 30;

// The most host memory one sample's captured data can take between the engine and the store
// (--max-length tokens, every generation step).
int64_t sample_bytes_bound(const CollectOptions& o, const CaptureLayout& c);

// collect's window without --batch-window (docs/TRACE_FORMAT.md, "Batching windows"): one shard on
// the CPU (its batches are cache-sized: a longer window would only hold more in memory); on CUDA
// the most whole shards up to kCudaWindowSamples whose captured data stays within
// kCudaWindowBytes, at least one.
int64_t default_batch_window(const CollectOptions& o, const CaptureLayout& c, bool cuda);

// A captured batch into its samples' SampleData (win->data[members[b]]), in parallel over samples.
void capture_samples(const CapturedBatch& r, const CaptureLayout& c, Window& win,
                     const std::vector<size_t>& members);

// ---- engine: batches in, captured batches out, in submit order -----------------------------------

// Keeps every slot of the engine busy: a finished batch is taken back only when all are in flight
// (the CPU engine has one, computed at submit()). Each captured batch goes to capture_samples().
class EngineStage {
 public:
  EngineStage(Engine& engine, const CaptureLayout& layout, const Observer& request,
              int64_t max_new_tokens, Progress& progress)
      : engine_(engine),
        layout_(layout),
        request_(request),
        max_new_tokens_(max_new_tokens),
        progress_(progress) {}

  void submit(Window& win, WindowBatch&& wb) {
    const double t0 = progress_clock();
    if (engine_.in_flight() == engine_.slots()) capture(engine_.poll(true));
    engine_.submit(wb.batch, request_, max_new_tokens_);
    int64_t real = 0;
    for (size_t j : wb.members) real += static_cast<int64_t>(win.items[j].ids.size());
    ++batches_;
    padded_tokens_ += wb.batch.B * wb.batch.S;
    real_tokens_ += real;
    tickets_.push_back(Ticket{&win, std::move(wb.members), real});
    ++win.outstanding;
    seconds_ += progress_clock() - t0;
  }
  // Whatever the engine has finished (wait: everything in flight).
  void drain(bool wait) {
    const double t0 = progress_clock();
    while (auto r = engine_.poll(wait)) capture(std::move(r));
    seconds_ += progress_clock() - t0;
  }
  double seconds() const { return seconds_; }  // submit, wait, copy out
  // Batches submitted, and their tokens: B × S computed, of which real (the rest is padding).
  int64_t batches() const { return batches_; }
  int64_t padded_tokens() const { return padded_tokens_; }
  int64_t real_tokens() const { return real_tokens_; }

 private:
  struct Ticket {
    Window* window;
    std::vector<size_t> members;
    int64_t real_tokens;  // the members' unpadded tokens
  };
  void capture(std::unique_ptr<CapturedBatch> r) {
    Ticket t = std::move(tickets_.front());
    tickets_.pop_front();
    capture_samples(*r, layout_, *t.window, t.members);
    progress_.batch_done(r->B, t.real_tokens, t.window->items[t.members.front()].dataset);
    --t.window->outstanding;
  }

  Engine& engine_;
  const CaptureLayout& layout_;
  const Observer& request_;
  int64_t max_new_tokens_;
  Progress& progress_;
  std::deque<Ticket> tickets_;
  double seconds_ = 0;
  int64_t batches_ = 0, padded_tokens_ = 0, real_tokens_ = 0;
};

// ---- store: finished windows into the trace store, on their own thread ---------------------------

LayerRecord record_of(const LayerData& l);
// router_topk() of rows rows of E fp32 logits into l's topk_values, topk_ids and lse.
void topk_of(const float* logits, int64_t rows, int64_t E, int K, LayerData* l);

// Finished windows reach the writer on this stage's thread (add() copies every logit once more),
// so the engine loop does not wait for it; at most two windows wait for it. Samples before
// `start` were committed by an earlier run and are skipped.
class StoreStage {
 public:
  struct Params {
    int64_t start = 0;     // samples committed by earlier runs
    uint64_t seed = 0;     // synthetic samples' seed
    int64_t L = 0, E = 0;  // encoder MoE layers, experts
    int max_length = 0;
    int64_t vocab_size = 0;
    size_t dec_layers = 0;    // decoder MoE layers (synthetic samples have zero steps)
    int logits_topk = 0;      // --logits topk:K
    int64_t kill_after = -1;  // MOETRACE_FAULT_KILL_AFTER (tests): SIGKILL after this many samples
  };
  StoreStage(TraceWriter& writer, const Params& p) : writer_(writer), p_(p) {
    thread_ = std::thread([this] {
      try {
        while (auto win = queue_.pop()) {
          const double t0 = progress_clock();
          write(*win);
          seconds_ += progress_clock() - t0;
        }
      } catch (...) {
        error_ = std::current_exception();
        queue_.stop();
      }
    });
  }
  ~StoreStage() { close(); }
  // Waits while two windows wait; rethrows the store's error if it failed.
  void push(Window&& win) {
    if (!queue_.push(std::move(win))) std::rethrow_exception(error_);
  }
  // Everything pushed is written (or the store failed: rethrow()).
  void close() {
    queue_.finish();
    if (thread_.joinable()) thread_.join();
  }
  void rethrow() const {
    if (error_) std::rethrow_exception(error_);
  }
  // Read after close().
  int64_t samples() const { return samples_; }
  int64_t tokens() const { return tokens_; }
  double seconds() const { return seconds_; }

 private:
  void write(Window& win) {
    std::vector<SampleRecord> records;
    std::deque<SyntheticSample> synthetic;  // owns what synthetic records point to
    std::deque<LayerData> synthetic_topk;   // and their top-K (--logits topk:K)
    for (size_t j = 0; j < win.items.size(); ++j) {
      if (win.begin + j < static_cast<size_t>(p_.start)) continue;  // committed by an earlier run
      WorkItem& w = win.items[j];
      SampleRecord& r = records.emplace_back();
      r.sample_id = w.sample_id;
      r.dataset = w.dataset;
      r.row = w.row;
      r.synthetic = w.synthetic;
      if (w.synthetic) {
        const SyntheticSample& syn = synthetic.emplace_back(
            make_synthetic(p_.seed, w.synthetic_index, p_.L, p_.E, p_.max_length, p_.vocab_size));
        r.token_ids = syn.token_ids;
        for (int64_t l = 0; l < p_.L; ++l) {
          r.enc.push_back(LayerRecord{syn.logits[l].data(), syn.expert[l].data(),
                                      syn.dropped.data(), syn.gate[l].data(), nullptr});
          if (p_.logits_topk > 0) {  // the same top-K rule as the engines' samples
            LayerData& t = synthetic_topk.emplace_back();
            topk_of(syn.logits[l].data(), static_cast<int64_t>(syn.token_ids.size()), p_.E,
                    p_.logits_topk, &t);
            r.enc.back().topk_logits = t.topk_values.data();
            r.enc.back().topk_ids = t.topk_ids.data();
            r.enc.back().lse = t.lse.data();
          }
        }
        r.dec.assign(p_.dec_layers, LayerRecord{});  // synthetic samples have no decoder pass
      } else {
        r.token_ids = std::move(w.ids);
        for (const LayerData& l : win.data[j].enc) r.enc.push_back(record_of(l));
        r.dec_input_ids = win.data[j].dec_in;
        r.dec_output_ids = win.data[j].dec_out;
        for (const LayerData& l : win.data[j].dec) r.dec.push_back(record_of(l));
      }
      tokens_ += static_cast<int64_t>(r.token_ids.size());
    }
    if (p_.kill_after < 0) {
      writer_.add(records);  // the whole window at once: copied in parallel
    } else {
      // Fault injection for resume tests: the shards filled before the kill_after-th sample are
      // committed first, so that what survives depends on the kill point, not on the commit
      // threads' timing; a shard that this sample fills is still being committed when it dies.
      for (const SampleRecord& r : records) {
        if (added_ + 1 == p_.kill_after) writer_.wait_for_commits();
        writer_.add(r);
        if (++added_ == p_.kill_after) std::raise(SIGKILL);
      }
    }
    samples_ += static_cast<int64_t>(records.size());
  }

  TraceWriter& writer_;
  Params p_;
  HandOff<Window> queue_{2};
  std::exception_ptr error_;  // set before queue_.stop(), read after a failed push or the join
  int64_t samples_ = 0, tokens_ = 0, added_ = 0;
  double seconds_ = 0;
  std::thread thread_;
};

// ---- the loop: tokenize -> batch -> engine -> capture -> store -----------------------------------

struct LoopResult {
  double engine_seconds = 0, wait_seconds = 0;
};

// Runs every window through the stages; once `stop` is set (SIGINT/SIGTERM) stops after the batch
// in flight and commits the complete prefix of the window it was in. same_length: window_batches'.
LoopResult run_windows(std::vector<WorkItem>& items, TokenizeStage& tokenize, EngineStage& engine,
                       StoreStage& store, Progress& progress, const BatchBudget& budget,
                       int32_t pad, bool same_length, int64_t start, const std::atomic<int>& stop);

}  // namespace moetrace::pipeline
