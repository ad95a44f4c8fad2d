#include "collect/collect.h"

#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <exception>
#include <map>
#include <mutex>
#include <numeric>
#include <optional>
#include <thread>

#include "collect/model_source.h"
#include "collect/progress.h"
#include "collect/synthetic.h"
#include "core/error.h"
#include "core/keys.h"
#include "core/log.h"
#include "data/catalog.h"
#include "data/plan.h"
#include "engine/engine.h"
#include "kernels/cpu/blas_info.h"
#include "kernels/cpu/ops.h"
#include "text/tokenizer.h"
#include "trace/store.h"

namespace moetrace {

namespace fs = std::filesystem;
using json = nlohmann::json;

std::vector<std::vector<size_t>> length_batches(const std::vector<int64_t>& lengths,
                                                int64_t batch_tokens) {
  std::vector<size_t> order(lengths.size());
  std::iota(order.begin(), order.end(), size_t{0});
  std::stable_sort(order.begin(), order.end(),
                   [&](size_t a, size_t b) { return lengths[a] > lengths[b]; });
  std::vector<std::vector<size_t>> batches;
  for (size_t i : order) {
    if (!batches.empty()) {
      auto& cur = batches.back();
      if (static_cast<int64_t>(cur.size() + 1) * lengths[cur.front()] <= batch_tokens) {
        cur.push_back(i);
        continue;
      }
    }
    batches.push_back({i});
  }
  return batches;
}

bool mixed_is_real(int64_t k, double ratio) {
  return std::floor(static_cast<double>(k + 1) * ratio) >
         std::floor(static_cast<double>(k) * ratio);
}

namespace {

// The signal (SIGINT or SIGTERM) that asked the run to stop, 0 while none did.
std::atomic<int> g_signal{0};

// Hands items from one thread to another, at most `capacity` waiting: the tokenizer thread's
// windows to the engine loop, and finished windows to the store thread.
template <class T>
class HandOff {
 public:
  explicit HandOff(size_t capacity) : capacity_(capacity) {}
  // Waits while full. False, and nothing queued, once the consumer has stopped.
  bool push(T item) {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [&] { return queue_.size() < capacity_ || stopped_; });
    if (stopped_) return false;
    queue_.push_back(std::move(item));
    cv_.notify_all();
    return true;
  }
  // Waits for an item; nullopt once the producer has finished and everything is taken, or the
  // consumer has stopped.
  std::optional<T> pop() {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [&] { return !queue_.empty() || finished_ || stopped_; });
    if (queue_.empty() || stopped_) return std::nullopt;
    T item = std::move(queue_.front());
    queue_.pop_front();
    cv_.notify_all();
    return item;
  }
  void finish() { set(&finished_); }  // producer: nothing more will come
  void stop() { set(&stopped_); }     // consumer: takes nothing more (a waiting push returns)

 private:
  void set(bool* flag) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      *flag = true;
    }
    cv_.notify_all();
  }
  size_t capacity_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<T> queue_;
  bool finished_ = false, stopped_ = false;
};
extern "C" void on_stop_signal(int sig) { g_signal = sig; }

// SIGINT and SIGTERM stop the run after the batch in flight (what is complete is committed); the
// handler is one-shot (SA_RESETHAND), so a second Ctrl-C ends the process at once (the store keeps
// its committed shards either way). Restores the previous handlers when it goes out of scope.
class StopSignals {
 public:
  StopSignals() {
    g_signal = 0;
    struct sigaction sa {};
    sa.sa_handler = on_stop_signal;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = SA_RESETHAND;
    sigaction(SIGINT, &sa, &old_int_);
    sigaction(SIGTERM, &sa, &old_term_);
  }
  ~StopSignals() {
    sigaction(SIGINT, &old_int_, nullptr);
    sigaction(SIGTERM, &old_term_, nullptr);
  }
  StopSignals(const StopSignals&) = delete;
  StopSignals& operator=(const StopSignals&) = delete;

 private:
  struct sigaction old_int_ {
  }, old_term_{};
};

// On the way out by an exception: removes `dir` if this run created it and it holds nothing but
// its lock file. (Declared after the StoreLock, so it runs while the lock is still held.)
class DirCleanup {
 public:
  DirCleanup(fs::path dir, bool armed)
      : dir_(std::move(dir)), armed_(armed), exceptions_(std::uncaught_exceptions()) {}
  ~DirCleanup() {
    if (!armed_ || std::uncaught_exceptions() <= exceptions_) return;
    std::error_code ec;
    for (const auto& ent : fs::directory_iterator(dir_, ec)) {
      if (ent.path().filename() != kStoreLockName) return;
    }
    fs::remove(dir_ / kStoreLockName, ec);
    fs::remove(dir_, ec);
  }
  DirCleanup(const DirCleanup&) = delete;
  DirCleanup& operator=(const DirCleanup&) = delete;

 private:
  fs::path dir_;
  bool armed_;
  int exceptions_;
};

// The store directory holds nothing but (maybe) its lock file.
bool empty_but_lock(const fs::path& dir) {
  std::error_code ec;
  for (const auto& ent : fs::directory_iterator(dir, ec)) {
    if (ent.path().filename() != kStoreLockName) return false;
  }
  return true;
}

std::string human_bytes(uint64_t n) {
  char buf[32];
  const double v = static_cast<double>(n);
  if (n >= (1ull << 30)) {
    std::snprintf(buf, sizeof buf, "%.1f GiB", v / (1ull << 30));
  } else if (n >= (1ull << 20)) {
    std::snprintf(buf, sizeof buf, "%.1f MiB", v / (1ull << 20));
  } else if (n >= 1024) {
    std::snprintf(buf, sizeof buf, "%.1f KiB", v / 1024);
  } else {
    std::snprintf(buf, sizeof buf, "%llu bytes", static_cast<unsigned long long>(n));
  }
  return buf;
}

// Bytes of the store's files (the shards and the manifest; a rank's own part only).
uint64_t store_bytes(const fs::path& dir) {
  uint64_t total = 0;
  std::error_code ec;
  for (const auto& ent : fs::directory_iterator(dir, ec)) {
    if (ent.is_regular_file(ec)) total += ent.file_size(ec);
  }
  return total;
}

// The option behind each "engine" field, for the refusal of a resume that differs.
const char* engine_option(const std::string& key) {
  if (key == "device") return "--device";
  if (key == "threads") return "--threads";
  if (key == "batch_tokens") return "--batch-tokens";
  if (key == "precision") return "--precision";
  return nullptr;  // blas: a property of the build and the machine
}

// A resume whose engine would compute other numbers than the store's: one line naming the option
// and both values. Stores written before the "engine" field resume as before.
void check_resume_engine(const fs::path& dir, const json& stored, const json& now) {
  if (!stored.is_object()) return;
  for (auto it = now.begin(); it != now.end(); ++it) {
    if (!stored.contains(it.key()) || stored[it.key()] == it.value()) continue;
    auto show = [](const json& v) { return v.is_string() ? v.get<std::string>() : v.dump(); };
    const std::string had = show(stored[it.key()]), want = show(it.value());
    if (const char* opt = engine_option(it.key())) {
      fail(dir.string(), ": cannot resume: the store was collected with ", opt, " ", had,
           ", this run has ", opt, " ", want, " (the routing would differ); pass ", opt, " ", had,
           " or use --overwrite");
    }
    fail(dir.string(), ": cannot resume: the store was collected with ", it.key(), " '", had,
         "', this run has '", want, "' (the routing would differ); use --overwrite");
  }
}

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
Plan plan_samples(const CollectOptions& o, const ModelChoice& mc, int64_t L) {
  Plan p;
  int64_t n_total = (o.traces + L - 1) / L;
  auto is_real = [&](int64_t k) {
    return o.mode == "real" || (o.mode == "mixed" && mixed_is_real(k, o.real_ratio));
  };
  int64_t n_real_wanted = 0;
  for (int64_t k = 0; k < n_total; ++k) n_real_wanted += is_real(k);
  // What the manifest records: the selection that reproduces the plan (the default's datasets).
  p.datasets_setting = !o.datasets.empty() ? o.datasets : mc.demo ? "demo" : "default";
  if (o.mode != "synthetic" && n_real_wanted > 0) {
    PlanOptions po;
    // The demo model reads the bundled rows unless told otherwise.
    po.datasets = o.datasets.empty() && mc.demo ? "demo" : o.datasets;
    po.split = o.split;
    po.data_roots = o.data_roots;
    if (mc.demo && po.data_roots.empty()) po.data_roots.push_back(data::demo_data_root());
    po.extra_catalog = o.catalog;
    po.seed = o.seed;
    po.max_samples = n_real_wanted;
    po.threads = o.threads;
    PlanStats stats;
    p.rows = build_plan(po, &stats);
    p.datasets_setting = stats.selection;
    if (static_cast<int64_t>(p.rows.size()) < n_real_wanted) {
      log_warn("the selected datasets hold ", p.rows.size(), " usable samples, fewer than the ",
               n_real_wanted, " real samples asked for; collecting those");
      if (o.mode == "real") n_total = static_cast<int64_t>(p.rows.size());
    }
  }
  int64_t real_i = 0, synth_i = 0;
  for (int64_t k = 0; k < n_total; ++k) {
    WorkItem w;
    if (is_real(k)) {
      if (real_i >= static_cast<int64_t>(p.rows.size())) continue;  // data ran out
      const PlannedSample& row = p.rows[static_cast<size_t>(real_i++)];
      w.sample_id = row.sample_id;
      w.dataset = row.dataset;
      w.row = row.row;
      w.text = &row.text;
    } else {
      w.synthetic = true;
      w.synthetic_index = synth_i;
      w.sample_id = "synthetic/" + std::to_string(synth_i);
      w.dataset = "synthetic";
      w.row = synth_i++;
    }
    w.index = static_cast<int64_t>(p.items.size());
    p.items.push_back(std::move(w));
  }
  return p;
}

// ---- tokenize: windows of samples, on their own thread -------------------------------------------

// Tokenizes window after window (at most two ahead) while the engine runs. A window is one shard's
// samples, so batches (and with them the float rounding of every logit) depend only on the plan: a
// resumed run or a rank of a data-parallel run (whose part starts at a shard boundary) recomputes
// exactly the batches of one uninterrupted process. With the GPU engine, each window is tokenized
// by several threads (one would not keep up).
class TokenizeStage {
 public:
  using Span = std::pair<size_t, size_t>;  // [begin, end) of the items
  TokenizeStage(std::vector<WorkItem>& items, const T5Tokenizer& tok, int max_length,
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
  const T5Tokenizer& tok_;
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
  std::vector<uint8_t> logits, hidden;
  DType logits_dtype = DType::kF32, hidden_dtype = DType::kF32;
  std::vector<float> gate;
  std::vector<int32_t> expert;
  std::vector<uint8_t> dropped;
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
std::vector<WindowBatch> window_batches(const Window& win, int64_t batch_tokens, int32_t pad) {
  std::vector<size_t> real;
  std::vector<int64_t> lengths;
  for (size_t j = 0; j < win.items.size(); ++j) {
    if (win.items[j].synthetic) continue;
    real.push_back(j);
    lengths.push_back(static_cast<int64_t>(win.items[j].ids.size()));
  }
  std::vector<std::vector<size_t>> groups = length_batches(lengths, batch_tokens);
  for (auto& g : groups) {
    for (size_t& j : g) j = real[j];
  }
  std::sort(groups.begin(), groups.end(), [](const auto& a, const auto& b) {
    return *std::min_element(a.begin(), a.end()) < *std::min_element(b.begin(), b.end());
  });
  std::vector<WindowBatch> out;
  for (auto& members : groups) {
    WindowBatch& wb = out.emplace_back();
    Batch& batch = wb.batch;
    batch.B = static_cast<int64_t>(members.size());
    batch.S = static_cast<int64_t>(win.items[members.front()].ids.size());
    batch.input_ids.assign(static_cast<size_t>(batch.B * batch.S), pad);
    batch.attention_mask.assign(static_cast<size_t>(batch.B * batch.S), 0);
    for (int64_t b = 0; b < batch.B; ++b) {
      const auto& ids = win.items[members[static_cast<size_t>(b)]].ids;
      std::copy(ids.begin(), ids.end(), batch.input_ids.begin() + b * batch.S);
      std::fill_n(batch.attention_mask.begin() + b * batch.S, ids.size(), 1);
    }
    wb.members = std::move(members);
  }
  return out;
}

// ---- capture: what the store needs of a batch, per sample ----------------------------------------

// The layers to keep and how: the request the engine is given, and the slicing of its batches.
struct CaptureLayout {
  std::vector<int> enc_layers, dec_layers;  // block indices of the sparse layers
  int64_t E = 0, d = 0;
  bool hidden = false;
  int32_t eos = 1;

  // Every stored field of every layer. F16 logits may cross the GPU's bus as they are; other
  // store dtypes are made from exact F32.
  KeyRequest request(DType store_logits, std::optional<DType> store_hidden) const {
    KeyRequest r;
    auto add = [&](keys::Stack s, int block) {
      r.add(keys::tensor(s, block, keys::kRouterLogits),
            store_logits == DType::kF16 ? DType::kF16 : DType::kF32);
      for (std::string_view f : {keys::kExpert, keys::kDropped, keys::kGate})
        r.add(keys::tensor(s, block, f));
      if (store_hidden) r.add(keys::tensor(s, block, keys::kHidden), *store_hidden);
    };
    for (int i : enc_layers) add(keys::Stack::kEncoder, i);
    for (int i : dec_layers) add(keys::Stack::kDecoder, i);
    return r;
  }
};

template <class T>
void copy_rows(const TensorView& t, int64_t row0, int64_t rows, int64_t width,
               std::vector<T>& out) {
  const T* src = t.as<T>() + row0 * width;
  out.assign(src, src + rows * width);
}
// Rows of a tensor of any dtype, as raw bytes.
void copy_raw_rows(const TensorView& t, int64_t row0, int64_t rows, int64_t width,
                   std::vector<uint8_t>& out, DType* dtype) {
  const size_t es = dtype_size(t.dtype);
  const auto* src = static_cast<const uint8_t*>(t.data) + static_cast<size_t>(row0 * width) * es;
  out.assign(src, src + static_cast<size_t>(rows * width) * es);
  *dtype = t.dtype;
}

// The views of one stack's layers in a captured batch, looked up (and checked) once.
struct LayerViews {
  TensorView logits, expert, dropped, gate, hidden;
};
std::vector<LayerViews> layer_views(const CapturedBatch& r, keys::Stack s,
                                    const std::vector<int>& blocks, bool hidden) {
  std::vector<LayerViews> out;
  for (int i : blocks) {
    auto get = [&](std::string_view field) {
      const std::string key = keys::tensor(s, i, field);
      const TensorView* v = r.find(key);
      if (v == nullptr) fail("engine: no captured tensor ", key);
      return *v;
    };
    LayerViews& l = out.emplace_back();
    l.logits = get(keys::kRouterLogits);
    l.expert = get(keys::kExpert);
    l.dropped = get(keys::kDropped);
    l.gate = get(keys::kGate);
    if (hidden) l.hidden = get(keys::kHidden);
  }
  return out;
}

// Rows [b*S, b*S+len) of one layer's [B,S,...] tensors (decoder: S = steps, len = the sample's).
LayerData layer_slice(const LayerViews& v, int64_t b, int64_t S, int64_t len, int64_t E, int64_t d,
                      bool hidden) {
  LayerData l;
  copy_raw_rows(v.logits, b * S, len, E, l.logits, &l.logits_dtype);
  copy_rows(v.expert, b * S, len, 1, l.expert);
  copy_rows(v.dropped, b * S, len, 1, l.dropped);
  copy_rows(v.gate, b * S, len, 1, l.gate);
  if (hidden) copy_raw_rows(v.hidden, b * S, len, d, l.hidden, &l.hidden_dtype);
  return l;
}

// A captured batch into its samples' SampleData (win->data[members[b]]), in parallel over samples.
void capture_samples(const CapturedBatch& r, const CaptureLayout& c, Window& win,
                     const std::vector<size_t>& members) {
  const auto enc = layer_views(r, keys::Stack::kEncoder, c.enc_layers, c.hidden);
  const auto dec = layer_views(r, keys::Stack::kDecoder, c.dec_layers, c.hidden);
  const GenerateResult& gen = r.generated;
#pragma omp parallel for schedule(dynamic, 8)
  for (int64_t b = 0; b < r.B; ++b) {
    const size_t j = members[static_cast<size_t>(b)];
    const auto len = static_cast<int64_t>(win.items[j].ids.size());
    SampleData& sd = win.data[j];
    for (const LayerViews& v : enc)
      sd.enc.push_back(layer_slice(v, b, r.S, len, c.E, c.d, c.hidden));
    if (c.dec_layers.empty()) continue;
    // Steps until this sequence produced eos (inclusive), else all steps run.
    const int32_t* ids = gen.ids.data() + b * (gen.steps + 1);
    int64_t G = gen.steps;
    for (int64_t t = 1; t <= gen.steps; ++t) {
      if (ids[t] == c.eos) {
        G = t;
        break;
      }
    }
    sd.dec_in.assign(ids, ids + G);
    sd.dec_out.assign(ids + 1, ids + G + 1);
    for (const LayerViews& v : dec)
      sd.dec.push_back(layer_slice(v, b, gen.steps, G, c.E, c.d, c.hidden));
  }
}

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
    tickets_.push_back(Ticket{&win, std::move(wb.members)});
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

 private:
  struct Ticket {
    Window* window;
    std::vector<size_t> members;
  };
  void capture(std::unique_ptr<CapturedBatch> r) {
    Ticket t = std::move(tickets_.front());
    tickets_.pop_front();
    capture_samples(*r, layout_, *t.window, t.members);
    int64_t real_tokens = 0;
    for (size_t j : t.members) real_tokens += static_cast<int64_t>(t.window->items[j].ids.size());
    progress_.batch_done(r->B, real_tokens, t.window->items[t.members.front()].dataset);
    --t.window->outstanding;
  }

  Engine& engine_;
  const CaptureLayout& layout_;
  const Observer& request_;
  int64_t max_new_tokens_;
  Progress& progress_;
  std::deque<Ticket> tickets_;
  double seconds_ = 0;
};

// ---- store: finished windows into the trace store, on their own thread ---------------------------

LayerRecord record_of(const LayerData& l) {
  LayerRecord r;
  r.router_logits_raw = l.logits.data();
  r.router_logits_raw_dtype = l.logits_dtype;
  r.expert = l.expert.data();
  r.dropped = l.dropped.data();
  r.gate = l.gate.data();
  if (!l.hidden.empty()) {
    r.hidden_raw = l.hidden.data();
    r.hidden_raw_dtype = l.hidden_dtype;
  }
  return r;
}

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
      for (const SampleRecord& r : records) {
        writer_.add(r);
        if (++added_ == p_.kill_after) std::raise(SIGKILL);  // fault injection for resume tests
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

// ---- the run's settings, as the manifest records them --------------------------------------------

std::string fixed1(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.1f", v);
  return buf;
}

std::string cpu_description(int threads) {
  std::string model = "unknown CPU";
  if (FILE* f = std::fopen("/proc/cpuinfo", "r")) {
    char line[512];
    while (std::fgets(line, sizeof line, f)) {
      if (std::strncmp(line, "model name", 10) == 0) {
        model = std::string(std::strchr(line, ':') + 2);
        if (!model.empty() && model.back() == '\n') model.pop_back();
        break;
      }
    }
    std::fclose(f);
  }
  return "cpu (" + std::to_string(threads) + " threads, " + model + ")";
}

void check_options(const CollectOptions& o) {
  if (o.mode != "real" && o.mode != "synthetic" && o.mode != "mixed") {
    fail("--mode '", o.mode, "': expected real, synthetic or mixed");
  }
  if (o.real_ratio < 0 || o.real_ratio > 1)
    fail("--real-ratio ", o.real_ratio, ": expected a value in [0, 1]");
  if (o.traces <= 0) fail("--traces ", o.traces, ": expected a positive number");
  if (o.max_length < 2) fail("--max-length ", o.max_length, ": expected at least 2");
  if (o.precision != "bf16" && o.precision != "fp16" && o.precision != "fp32") {
    fail("--precision '", o.precision, "': expected bf16, fp16 or fp32");
  }
  if (o.decoder && o.max_new_tokens < 1)
    fail("--max-new-tokens ", o.max_new_tokens, ": expected at least 1 with --decoder");
}

DType precision_dtype(const std::string& p) {
  return p == "fp32" ? DType::kF32 : p == "fp16" ? DType::kF16 : DType::kBF16;
}

StoreSettings store_settings(const CollectOptions& o, const ModelChoice& mc, const T5Tokenizer& tok,
                             const Plan& plan, const CaptureLayout& layout, const DeviceChoice& dev,
                             int64_t batch_tokens) {
  StoreSettings ss;
  ss.settings = {
      {"mode", o.mode},
      {"traces", o.traces},
      {"real_ratio", o.real_ratio},
      {"datasets", plan.datasets_setting},
      {"split", o.split},
      {"catalog", o.catalog.string()},
      {"seed", o.seed},
      {"max_length", o.max_length},
      {"logits_dtype", dtype_name(o.logits_dtype)},
      {"hidden_dtype", o.hidden_dtype ? std::string(dtype_name(*o.hidden_dtype)) : "none"},
      {"decoder", o.decoder},
      {"max_new_tokens", o.decoder ? o.max_new_tokens : 0},
      {"samples_per_shard", o.samples_per_shard},
      {"num_samples", static_cast<int64_t>(plan.items.size())}};
  ss.model = describe_model(mc, tok.sha256());
  ss.command_line = o.command_line;
  ss.enc_layers = layout.enc_layers;
  ss.dec_layers = layout.dec_layers;
  ss.num_experts = layout.E;
  ss.d_model = layout.d;
  ss.logits_dtype = o.logits_dtype;
  ss.hidden_dtype = o.hidden_dtype;
  ss.decoder = o.decoder;
  ss.samples_per_shard = o.samples_per_shard;
  const int threads = cpu::num_threads();
  ss.device = dev.cuda ? dev.name() + " (" + o.precision + ")" : cpu_description(threads);
  // What changes the numbers besides the settings: a resume must match it (check_resume_engine).
  ss.engine = {{"device", dev.cuda ? "cuda" : "cpu"}, {"batch_tokens", batch_tokens}};
  if (dev.cuda) {
    ss.engine["precision"] = o.precision;
  } else {
    ss.engine["precision"] = "fp32";
    ss.engine["threads"] = threads;
    ss.engine["blas"] = cpu::blas_config();
  }
  return ss;
}

// A rank collects its block of the global plan (settings.num_samples stays global).
void take_part(Plan& plan, StoreSettings& ss, const CollectOptions& o) {
  const LaunchInfo& launch = o.launch;
  ss.part = plan_part(static_cast<int64_t>(plan.items.size()), o.samples_per_shard, launch.rank,
                      launch.world_size);
  auto& items = plan.items;
  const auto first = static_cast<std::ptrdiff_t>(ss.part->first_sample);
  items.erase(items.begin() + first + static_cast<std::ptrdiff_t>(ss.part->num_samples),
              items.end());
  items.erase(items.begin(), items.begin() + first);
  log_info("rank ", launch.rank, ": samples [", ss.part->first_sample, ", ",
           ss.part->first_sample + ss.part->num_samples, ") of ", ss.part->total_samples);
}

// A resume is checked before the engine starts: other settings are refused at once. Returns true
// when the store already holds every planned sample (nothing to do).
bool check_resume_store(const fs::path& dir, StoreSettings& ss, int64_t planned_here,
                        const CollectOptions& o, bool parallel) {
  std::error_code ec;
  if (!o.resume || !fs::exists(dir / "manifest.json", ec)) return false;
  const json m = check_resume(dir, ss);
  const int64_t have = m.value("num_samples", int64_t{0});
  if (m.value("complete", false) && have >= planned_here) {
    log_info(dir.string(), ": already complete (", have, " samples, ",
             m.value("total_traces", int64_t{0}), " traces); nothing to do");
    return true;
  }
  // Only an engine that computes new samples must match the store's.
  check_resume_engine(dir, m.value("engine", json()), ss.engine);
  // Extending a store past the end of the plan that wrote it: that plan's last window was cut
  // short, so the samples of it in the store were batched otherwise than this plan batches them;
  // they are computed again (docs/TRACE_FORMAT.md).
  const json& had = m.contains("settings") ? m["settings"] : json();
  const int64_t planned = had.is_object() ? had.value("num_samples", int64_t{-1}) : -1;
  const int64_t cut = planned % o.samples_per_shard;
  ss.redo_partial_shard =
      !parallel && planned > 0 && planned < planned_here && cut != 0 && have > planned - cut;
  return false;
}

// The store directory of this process (a rank's own part), refused before any slow work when it
// cannot be used (the writer checks again, fully).
fs::path check_store_dir(const CollectOptions& o) {
  const LaunchInfo& launch = o.launch;
  const fs::path dir = launch.world_size > 1
                           ? rank_store_dir(o.output, launch.rank, launch.world_size)
                           : fs::path(o.output);
  std::error_code ec;
  if (fs::exists(dir, ec) && !fs::is_directory(dir, ec))
    fail(dir.string(), ": exists and is not a directory");
  if (!o.resume && !o.overwrite && fs::is_directory(dir, ec) && !empty_but_lock(dir)) {
    fail(dir.string(),
         ": is not empty; use --resume to continue a store of the same settings or --overwrite to "
         "replace it");
  }
  return dir;
}

// ---- the loop: tokenize -> batch -> engine -> capture -> store -----------------------------------

struct LoopResult {
  double engine_seconds = 0, wait_seconds = 0;
};

// Runs every window through the stages; after SIGINT/SIGTERM stops after the batch in flight and
// commits the complete prefix of the window it was in.
LoopResult run_windows(std::vector<WorkItem>& items, TokenizeStage& tokenize, EngineStage& engine,
                       StoreStage& store, Progress& progress, int64_t batch_tokens, int32_t pad,
                       int64_t start) {
  LoopResult lr;
  std::deque<Window> windows;  // references stay valid: only push_back and pop_front
  auto store_finished_windows = [&] {
    while (!windows.empty() && windows.front().submitted && windows.front().outstanding == 0) {
      Window& win = windows.front();
      int64_t synthetic = 0;
      for (size_t j = 0; j < win.items.size(); ++j)
        synthetic += win.items[j].synthetic && win.begin + j >= static_cast<size_t>(start);
      store.push(std::move(win));
      windows.pop_front();
      progress.samples_skipped(synthetic);
    }
  };
  while (true) {
    const double t0 = progress_clock();
    const std::optional<TokenizeStage::Span> span = tokenize.next();
    lr.wait_seconds += progress_clock() - t0;
    if (!span) break;  // all windows done, or the tokenizer failed (rethrown by the caller)
    Window& win = windows.emplace_back();
    win.begin = span->first;
    win.items.assign(
        std::make_move_iterator(items.begin() + static_cast<std::ptrdiff_t>(span->first)),
        std::make_move_iterator(items.begin() + static_cast<std::ptrdiff_t>(span->second)));
    win.data.resize(win.items.size());
    for (WindowBatch& wb : window_batches(win, batch_tokens, pad)) {
      if (g_signal != 0) break;
      engine.submit(win, std::move(wb));
    }
    if (g_signal != 0) break;
    win.submitted = true;
    engine.drain(false);  // whatever the engine has finished meanwhile, without waiting
    store_finished_windows();
  }
  // The rest of the engine's work, then every window that is complete (after Ctrl-C the partly
  // submitted window stays unwritten: a resumed run redoes it).
  engine.drain(true);
  store_finished_windows();
  if (g_signal != 0 && !windows.empty()) {
    // Stopped inside a window: its samples up to the first one still missing are complete
    // (batches run in the order of their first sample); they are committed, and a resumed run
    // recomputes the window's batches and writes from the next sample on.
    Window& win = windows.front();
    size_t done = 0;
    while (done < win.items.size() && (win.items[done].synthetic || !win.data[done].enc.empty()))
      ++done;
    win.items.resize(done);
    win.data.resize(done);
    win.submitted = true;
    store_finished_windows();
  }
  lr.engine_seconds = engine.seconds();
  return lr;
}

}  // namespace

CollectResult run_collect(const CollectOptions& o) {
  check_options(o);
  // The device first: `--device cuda` without a GPU fails before any slow work or any file.
  const LaunchInfo& launch = o.launch;
  const DeviceChoice dev = resolve_device(o.device, launch.local_rank);
  // Batch budget: the GPU wants large batches (128 × 256 fills an H100/H200), the CPU cache-sized
  // ones.
  const int64_t batch_tokens = o.batch_tokens > 0 ? o.batch_tokens
                               : dev.cuda         ? kDefaultBatchTokensCuda
                                                  : kDefaultBatchTokensCpu;
  if (batch_tokens < o.max_length)
    fail("--batch-tokens ", batch_tokens, " must be >= --max-length ", o.max_length);
  if (o.resume && o.overwrite) fail("--resume and --overwrite exclude each other");
  const bool parallel = launch.world_size > 1;
  const OpenMode mode = o.resume      ? OpenMode::kResume
                        : o.overwrite ? OpenMode::kOverwrite
                                      : OpenMode::kCreate;
  const fs::path store_dir = check_store_dir(o);
  // One process per store directory for the whole run (a rank locks its own part): a second one is
  // refused here, before it reads or removes anything.
  std::error_code ec;
  const bool created_dir = !fs::exists(store_dir, ec);
  const StoreLock lock(store_dir);
  // A run that fails before its store holds anything removes the directory it created (with its
  // lock file), so that nothing of it blocks the next run (a rank directory would).
  const DirCleanup cleanup(store_dir, created_dir);
  if (parallel) {
    log_info("data-parallel collection: rank ", launch.rank, " of ", launch.world_size,
             " (local rank ", launch.local_rank, ") from ", launch.source, ", writing ",
             store_dir.string());
  }
  prepare_parallel_store(o.output, launch.rank, launch.world_size, mode);
  // Ranks sharing a machine share its cores (OpenMP copies, the CPU engine) unless told otherwise.
  const int threads_wanted =
      o.threads != 0 ? o.threads : default_threads(launch, process_environment(), dev.cuda);
  if (threads_wanted != o.threads) log_info("rank ", launch.rank, ": ", threads_wanted, " threads");
  cpu::set_num_threads(threads_wanted);
  const double t_start = progress_clock();

  // Model, tokenizer and plan.
  ModelChoice mc = choose_model(o.model, !o.decoder);
  const SwitchConfig& cfg = mc.config;
  if (o.tokenizer.empty() && !fs::exists(mc.spiece)) {
    fail(mc.spiece.string(), ": no spiece.model beside the checkpoint; pass --tokenizer FILE");
  }
  const T5Tokenizer tok = T5Tokenizer::load(o.tokenizer.empty() ? mc.spiece : o.tokenizer);
  CaptureLayout layout;
  layout.enc_layers = cfg.sparse_encoder_blocks();
  if (o.decoder) layout.dec_layers = cfg.sparse_decoder_blocks();
  layout.E = cfg.num_experts;
  layout.d = cfg.d_model;
  layout.hidden = o.hidden_dtype.has_value();
  layout.eos = static_cast<int32_t>(cfg.eos_token_id);
  if (layout.enc_layers.empty())
    fail(mc.id, ": the model has no sparse encoder layers: nothing to trace");
  const auto L = static_cast<int64_t>(layout.enc_layers.size());
  Plan plan = plan_samples(o, mc, L);

  // The store's settings; a rank's part; a resume checked before the engine starts.
  StoreSettings ss = store_settings(o, mc, tok, plan, layout, dev, batch_tokens);
  if (parallel) take_part(plan, ss, o);
  std::vector<WorkItem>& items = plan.items;
  if (check_resume_store(store_dir, ss, static_cast<int64_t>(items.size()), o, parallel)) {
    if (parallel) assemble_after_rank(o.output, launch);
    return CollectResult{};
  }

  // The engine (model weights materialised once), before the store is opened: a failed start
  // leaves the store as it was.
  EngineOptions eo;
  eo.device = dev;  // --device cuda:N, else the local rank's GPU
  eo.precision = dev.cuda ? precision_dtype(o.precision) : DType::kF32;
  eo.load.encoder_only = !o.decoder;
  const double t_load = progress_clock();
  std::unique_ptr<Engine> engine = make_engine(eo, cfg, mc.weights);
  const Engine::Memory mem = engine->memory();
  // The seed's "Model loaded successfully!", with what a user checks first.
  log_info("model loaded: ", mc.id, " on ", ss.device, ", ", human_bytes(mem.bytes), " ", mem.what,
           ", in ", fixed1(progress_clock() - t_load), " s");
  if (mc.demo) {
    log_warn("demo model: seeded random weights in the switch-base layout (", cfg.num_layers,
             " layers, d_model ", cfg.d_model, ", ", layout.E,
             " experts); its routing is not a trained model's");
  }

  std::unique_ptr<TraceWriter> writer = TraceWriter::open(store_dir, ss, mode);
  const int64_t start = writer->committed_samples();
  if (start > 0) log_info("resuming ", store_dir.string(), " after ", start, " committed samples");
  if (start > static_cast<int64_t>(items.size()))
    fail(store_dir.string(), ": the store holds more samples than this run plans");

  // The stages. A resumed run starts at the window of its first uncommitted sample and writes from
  // that sample on.
  const auto per_window = static_cast<size_t>(o.samples_per_shard);
  const size_t first_window = static_cast<size_t>(start) - static_cast<size_t>(start) % per_window;
  const unsigned tok_threads =
      dev.cuda ? std::clamp(std::thread::hardware_concurrency(), 2u, 10u) - 1 : 1;
  TokenizeStage tokenize(items, tok, o.max_length, first_window, per_window, tok_threads);
  const double t_loop = progress_clock();
  const StopSignals stop_signals;
  Progress progress(static_cast<int64_t>(items.size()), start, L, o.progress);
  const KeyRequest request = layout.request(o.logits_dtype, o.hidden_dtype);
  EngineStage engine_stage(*engine, layout, request, o.decoder ? o.max_new_tokens : 0, progress);
  StoreStage::Params sp;
  sp.start = start;
  sp.seed = o.seed;
  sp.L = L;
  sp.E = layout.E;
  sp.max_length = o.max_length;
  sp.vocab_size = cfg.vocab_size;
  sp.dec_layers = layout.dec_layers.size();
  // MOETRACE_FAULT_KILL_AFTER=N: SIGKILL this process right after the N-th sample of this run
  // reached the writer (tests kill runs at chosen points, between and inside shard commits).
  const char* fault = std::getenv("MOETRACE_FAULT_KILL_AFTER");
  sp.kill_after = fault != nullptr ? std::atoll(fault) : -1;
  StoreStage store(*writer, sp);
  LoopResult lr;
  try {
    lr = run_windows(items, tokenize, engine_stage, store, progress, batch_tokens,
                     static_cast<int32_t>(cfg.pad_token_id), start);
    store.close();
    store.rethrow();
  } catch (...) {
    tokenize.stop();
    store.close();
    throw;
  }
  tokenize.stop();
  tokenize.rethrow();
  progress.finish();

  CollectResult result;
  result.samples = store.samples();
  result.tokens = store.tokens();
  result.seconds = progress_clock() - t_start;
  result.loop_seconds = progress_clock() - t_loop;
  result.engine_seconds = lr.engine_seconds;
  result.traces = result.samples * L;
  if (g_signal != 0) {
    writer->commit_partial();
    result.interrupted = true;
    result.signal = g_signal;
    if (o.progress) std::fprintf(stderr, "\n");
    log_warn("interrupted (", g_signal == SIGTERM ? "SIGTERM" : "SIGINT", "); ",
             writer->durable_samples(), " samples are committed in ", store_dir.string(),
             "; continue with the same command plus --resume");
    writer.reset();
    log_info("Output: ", store_dir.string(), " (", human_bytes(store_bytes(store_dir)),
             ", incomplete)");
    return result;
  }
  // The collection time of the store is the loop's (model loading excluded), summed over resumed
  // runs; the store's throughput is its tokens over that time: the one figure that the log, the
  // summary, the manifest and `inspect` show.
  writer->finish(result.loop_seconds);
  writer.reset();
  const double throughput =
      TraceStore::open(store_dir).manifest().value("throughput_tokens_per_s", 0.0);
  // One line with the numbers benchmarks read (scripts/gpu_check.sh): loop = after model load.
  log_info("timing: total ", fixed1(result.seconds), " s, loop ", result.loop_seconds,
           " s, engine ", result.engine_seconds, " s, ", result.tokens, " tokens; throughput ",
           fixed1(throughput), " tokens/s");
  log_info("loop breakdown: engine (submit, wait, copy out) ", result.engine_seconds,
           " s, waiting for the tokenizer ", lr.wait_seconds, " s, handing samples to the store ",
           store.seconds(), " s");
  print_collect_summary(store_dir, stderr);
  if (parallel) assemble_after_rank(o.output, launch);
  log_info("Output: ", store_dir.string(), " (", human_bytes(store_bytes(store_dir)), ")");
  return result;
}

}  // namespace moetrace
