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
#include <set>
#include <thread>

#include "collect/audit.h"
#include "collect/model_source.h"
#include "collect/progress.h"
#include "collect/synthetic.h"
#include "core/error.h"
#include "core/log.h"
#include "data/catalog.h"
#include "data/plan.h"
#include "kernels/cpu/blas_info.h"
#include "kernels/cpu/ops.h"
#include "model/switch_model.h"
#ifdef MOETRACE_WITH_CUDA
#include "model/cuda/cuda_switch_model.h"
#endif
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

// One sample of the run, in store order.
struct WorkItem {
  int64_t index = 0;  // global sample index
  bool synthetic = false;
  int64_t synthetic_index = 0;
  std::string sample_id, dataset;
  int64_t row = 0;
  const std::string* text = nullptr;  // real samples: the prompt
  std::vector<int32_t> ids;
};

// Copies what the store needs from each batch: per key the [B,S,...] tensor (decoder keys once per
// step).
class BatchCapture : public Observer {
 public:
  BatchCapture(std::vector<int> enc, std::vector<int> dec, bool hidden) : hidden_(hidden) {
    for (int i : enc) add_layer("enc." + std::to_string(i) + ".");
    for (int i : dec) add_layer("dec." + std::to_string(i) + ".");
  }
  bool wants(std::string_view key) const override { return wanted_.count(std::string(key)) > 0; }
  void observe(std::string_view key, const TensorView& t) override {
    data_[std::string(key)].push_back(Tensor::from_view(t));
  }
  const std::vector<Tensor>& get(const std::string& key) const { return data_.at(key); }
  void clear() { data_.clear(); }

 private:
  void add_layer(const std::string& p) {
    for (const char* n : {"router_logits", "expert", "dropped", "gate"}) wanted_.insert(p + n);
    if (hidden_) wanted_.insert(p + "hidden");
  }
  bool hidden_;
  std::set<std::string> wanted_;
  std::map<std::string, std::vector<Tensor>> data_;
};

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

// Rows [b*S, b*S+len) of one layer's tensors; `get` maps a key to a [B,S,...] view.
template <class Get>
LayerData layer_slice(const Get& get, const std::string& p, int64_t b, int64_t S, int64_t len,
                      int64_t E, int64_t d, bool hidden) {
  LayerData l;
  copy_raw_rows(get(p + "router_logits"), b * S, len, E, l.logits, &l.logits_dtype);
  copy_rows(get(p + "expert"), b * S, len, 1, l.expert);
  copy_rows(get(p + "dropped"), b * S, len, 1, l.dropped);
  copy_rows(get(p + "gate"), b * S, len, 1, l.gate);
  if (hidden) copy_raw_rows(get(p + "hidden"), b * S, len, d, l.hidden, &l.hidden_dtype);
  return l;
}

// Decoder layer of sample b over its first G steps (one [B,1,...] tensor per step).
LayerData decoder_slice(const BatchCapture& cap, const std::string& p, int64_t b, int64_t G,
                        int64_t E, int64_t d, bool hidden) {
  LayerData l;
  const auto& logits = cap.get(p + "router_logits");
  for (int64_t t = 0; t < G; ++t) {
    const float* r = logits[t].data<float>() + b * E;
    const auto* rb = reinterpret_cast<const uint8_t*>(r);
    l.logits.insert(l.logits.end(), rb, rb + E * sizeof(float));
    l.expert.push_back(cap.get(p + "expert")[t].data<int32_t>()[b]);
    l.dropped.push_back(cap.get(p + "dropped")[t].data<uint8_t>()[b]);
    l.gate.push_back(cap.get(p + "gate")[t].data<float>()[b]);
    if (hidden) {
      const auto* h =
          reinterpret_cast<const uint8_t*>(cap.get(p + "hidden")[t].data<float>() + b * d);
      l.hidden.insert(l.hidden.end(), h, h + d * sizeof(float));
    }
  }
  return l;
}

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

std::vector<std::vector<size_t>> make_batches(const std::vector<WorkItem>& items,
                                              const std::vector<size_t>& real,
                                              int64_t batch_tokens) {
  std::vector<int64_t> lengths;
  for (size_t i : real) lengths.push_back(static_cast<int64_t>(items[i].ids.size()));
  auto batches = length_batches(lengths, batch_tokens);
  for (auto& b : batches) {
    for (size_t& j : b) j = real[j];
  }
  return batches;
}

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

}  // namespace

CollectResult run_collect(const CollectOptions& o) {
  if (o.mode != "real" && o.mode != "synthetic" && o.mode != "mixed") {
    fail("--mode '", o.mode, "': expected real, synthetic or mixed");
  }
  if (o.real_ratio < 0 || o.real_ratio > 1)
    fail("--real-ratio ", o.real_ratio, ": expected a value in [0, 1]");
  if (o.traces <= 0) fail("--traces ", o.traces, ": expected a positive number");
  if (o.max_length < 2) fail("--max-length ", o.max_length, ": expected at least 2");
  if (!(o.audit >= 0 && o.audit <= 1)) fail("--audit ", o.audit, ": expected a fraction in [0, 1]");
  if (o.precision != "bf16" && o.precision != "fp16" && o.precision != "fp32" &&
      o.precision != "mixed") {
    fail("--precision '", o.precision, "': expected bf16, fp16, fp32 or mixed");
  }
  // The device first: `--device cuda` without a GPU fails before any slow work or any file.
  const LaunchInfo& launch = o.launch;
  const DeviceChoice dev =
      resolve_device(o.device, launch.local_rank, built_with_cuda(), visible_cuda_devices);
  const bool on_gpu = dev.cuda;
  // Batch budget: the GPU wants large batches (128 × 256 fills an H100/H200), the CPU cache-sized
  // ones.
  const int64_t batch_tokens = o.batch_tokens > 0 ? o.batch_tokens
                               : on_gpu           ? kDefaultBatchTokensCuda
                                                  : kDefaultBatchTokensCpu;
  if (batch_tokens < o.max_length)
    fail("--batch-tokens ", batch_tokens, " must be >= --max-length ", o.max_length);
  if (o.resume && o.overwrite) fail("--resume and --overwrite exclude each other");
  // Refuse an unusable output before any slow work (the writer checks again, fully). A rank of a
  // data-parallel run writes its own part, output/ranks/rank-RRRRR-of-WWWWW/.
  const bool parallel = launch.world_size > 1;
  const OpenMode mode = o.resume      ? OpenMode::kResume
                        : o.overwrite ? OpenMode::kOverwrite
                                      : OpenMode::kCreate;
  const fs::path store_dir =
      parallel ? rank_store_dir(o.output, launch.rank, launch.world_size) : fs::path(o.output);
  std::error_code ec;
  if (fs::exists(store_dir, ec) && !fs::is_directory(store_dir, ec))
    fail(store_dir.string(), ": exists and is not a directory");
  if (!o.resume && !o.overwrite && fs::is_directory(store_dir, ec) && !empty_but_lock(store_dir)) {
    fail(store_dir.string(),
         ": is not empty; use --resume to continue a store of the same settings or --overwrite to "
         "replace it");
  }
  // One process per store directory for the whole run (a rank locks its own part): a second one is
  // refused here, before it reads or removes anything.
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
      o.threads != 0 ? o.threads : default_threads(launch, process_environment(), on_gpu);
  if (threads_wanted != o.threads) log_info("rank ", launch.rank, ": ", threads_wanted, " threads");
  cpu::set_num_threads(threads_wanted);
  const double t_start = progress_clock();

  // Model and tokenizer.
  ModelChoice mc = choose_model(o.model, !o.decoder);
  const SwitchConfig& cfg = mc.config;
  if (o.tokenizer.empty() && !fs::exists(mc.spiece)) {
    fail(mc.spiece.string(), ": no spiece.model beside the checkpoint; pass --tokenizer FILE");
  }
  const T5Tokenizer tok = T5Tokenizer::load(o.tokenizer.empty() ? mc.spiece : o.tokenizer);
  const std::vector<int> enc_layers = cfg.sparse_encoder_blocks();
  const std::vector<int> dec_layers = o.decoder ? cfg.sparse_decoder_blocks() : std::vector<int>{};
  if (enc_layers.empty()) fail(mc.id, ": the model has no sparse encoder layers: nothing to trace");
  const int64_t L = static_cast<int64_t>(enc_layers.size()), E = cfg.num_experts, d = cfg.d_model;

  // How many samples of each kind, in which order.
  int64_t n_total = (o.traces + L - 1) / L;
  std::vector<PlannedSample> plan;
  const bool need_real = o.mode != "synthetic";
  int64_t n_real_wanted = 0;
  for (int64_t k = 0; k < n_total; ++k) {
    n_real_wanted += o.mode == "real" || (o.mode == "mixed" && mixed_is_real(k, o.real_ratio));
  }
  // What the manifest records: the selection that reproduces the plan (the default's datasets).
  std::string datasets_setting = !o.datasets.empty() ? o.datasets : mc.demo ? "demo" : "default";
  if (need_real && n_real_wanted > 0) {
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
    plan = build_plan(po, &stats);
    datasets_setting = stats.selection;
    if (static_cast<int64_t>(plan.size()) < n_real_wanted) {
      log_warn("the selected datasets hold ", plan.size(), " usable samples, fewer than the ",
               n_real_wanted, " real samples asked for; collecting those");
      if (o.mode == "real") n_total = static_cast<int64_t>(plan.size());
    }
  }
  std::vector<WorkItem> items;  // ids filled lazily by the tokenizer thread
  {
    int64_t real_i = 0, synth_i = 0;
    for (int64_t k = 0; k < n_total; ++k) {
      const bool real = o.mode == "real" || (o.mode == "mixed" && mixed_is_real(k, o.real_ratio));
      WorkItem w;
      w.index = k;
      if (real) {
        if (real_i >= static_cast<int64_t>(plan.size())) continue;  // data ran out
        const PlannedSample& p = plan[static_cast<size_t>(real_i++)];
        w.sample_id = p.sample_id;
        w.dataset = p.dataset;
        w.row = p.row;
        w.text = &p.text;
      } else {
        w.synthetic = true;
        w.synthetic_index = synth_i;
        w.sample_id = "synthetic/" + std::to_string(synth_i);
        w.dataset = "synthetic";
        w.row = synth_i++;
      }
      w.index = static_cast<int64_t>(items.size());
      items.push_back(std::move(w));
    }
  }

  // The store.
  StoreSettings ss;
  ss.settings = {
      {"mode", o.mode},
      {"traces", o.traces},
      {"real_ratio", o.real_ratio},
      {"datasets", datasets_setting},
      {"split", o.split},
      {"catalog", o.catalog.string()},
      {"seed", o.seed},
      {"max_length", o.max_length},
      {"logits_dtype", dtype_name(o.logits_dtype)},
      {"hidden_dtype", o.hidden_dtype ? std::string(dtype_name(*o.hidden_dtype)) : "none"},
      {"decoder", o.decoder},
      {"max_new_tokens", o.decoder ? o.max_new_tokens : 0},
      {"samples_per_shard", o.samples_per_shard},
      {"num_samples", static_cast<int64_t>(items.size())}};
  ss.model = describe_model(mc, tok.sha256());
  ss.command_line = o.command_line;
  ss.enc_layers = enc_layers;
  ss.dec_layers = dec_layers;
  ss.num_experts = E;
  ss.d_model = d;
  ss.logits_dtype = o.logits_dtype;
  ss.hidden_dtype = o.hidden_dtype;
  ss.decoder = o.decoder;
  ss.samples_per_shard = o.samples_per_shard;
  const int threads = cpu::num_threads();
  ss.device = on_gpu ? dev.name() + " (" + o.precision + ")" : cpu_description(threads);
  // What changes the numbers besides the settings: a resume must match it (checked below).
  ss.engine = {{"device", on_gpu ? "cuda" : "cpu"}, {"batch_tokens", batch_tokens}};
  if (on_gpu) {
    ss.engine["precision"] = o.precision;
  } else {
    if (o.precision == "mixed")
      log_info("--precision mixed: the CPU engine computes everything in fp32, so mixed is fp32");
    ss.engine["precision"] = "fp32";
    ss.engine["threads"] = threads;
    ss.engine["blas"] = cpu::blas_config();
  }
  // A rank collects its block of the global plan (settings.num_samples above stays global).
  if (parallel) {
    ss.part = plan_part(static_cast<int64_t>(items.size()), o.samples_per_shard, launch.rank,
                        launch.world_size);
    const auto first = static_cast<std::ptrdiff_t>(ss.part->first_sample);
    items.erase(items.begin() + first + static_cast<std::ptrdiff_t>(ss.part->num_samples),
                items.end());
    items.erase(items.begin(), items.begin() + first);
    log_info("rank ", launch.rank, ": samples [", ss.part->first_sample, ", ",
             ss.part->first_sample + ss.part->num_samples, ") of ", ss.part->total_samples);
  }
  // A resume is checked before the engine starts: other settings are refused at once, and a store
  // that already holds every planned sample is left as it is.
  if (o.resume && fs::exists(store_dir / "manifest.json", ec)) {
    const json m = check_resume(store_dir, ss);
    const int64_t have = m.value("num_samples", int64_t{0});
    if (m.value("complete", false) && have >= static_cast<int64_t>(items.size())) {
      log_info(store_dir.string(), ": already complete (", have, " samples, ",
               m.value("total_traces", int64_t{0}), " traces); nothing to do");
      if (parallel) assemble_after_rank(o.output, launch);
      return CollectResult{};
    }
    // Only an engine that computes new samples must match the store's.
    check_resume_engine(store_dir, m.value("engine", json()), ss.engine);
    // Extending a store past the end of the plan that wrote it: that plan's last window was cut
    // short, so the samples of it in the store were batched otherwise than this plan batches
    // them; they are computed again (docs/TRACE_FORMAT.md).
    const json& had = m.contains("settings") ? m["settings"] : json();
    const int64_t planned = had.is_object() ? had.value("num_samples", int64_t{-1}) : -1;
    const int64_t cut = planned % o.samples_per_shard;
    ss.redo_partial_shard = !parallel && planned > 0 &&
                            planned < static_cast<int64_t>(items.size()) && cut != 0 &&
                            have > planned - cut;
  }

  // The engine (model weights materialised once), before the store is opened: a failed start
  // leaves the store as it was.
  LoadOptions lo;
  lo.encoder_only = !o.decoder;
  std::unique_ptr<SwitchModel> model;
  const double t_load = progress_clock();
  std::string model_memory;
#ifdef MOETRACE_WITH_CUDA
  std::unique_ptr<CudaSwitchModel> gpu;
  if (on_gpu) {
    CudaOptions co = cuda_options_for_precision(o.precision);
    co.device = dev.index;  // --device cuda:N, else the local rank's GPU
    gpu = CudaSwitchModel::from_source(cfg, mc.weights, lo, co);
    model_memory = human_bytes(gpu->device_bytes()) + " of GPU memory";
  } else {
    model = SwitchModel::from_source(cfg, mc.weights, lo);
  }
#else
  model = SwitchModel::from_source(cfg, mc.weights, lo);
#endif
  if (model_memory.empty()) model_memory = human_bytes(resident_bytes()) + " resident";
  // The seed's "Model loaded successfully!", with what a user checks first.
  log_info("model loaded: ", mc.id, " on ", ss.device, ", ", model_memory, ", in ",
           fixed1(progress_clock() - t_load), " s");
  if (mc.demo) {
    log_warn("demo model: seeded random weights in the switch-base layout (", cfg.num_layers,
             " layers, d_model ", cfg.d_model, ", ", E,
             " experts); its routing is not a trained model's");
  }

  std::unique_ptr<TraceWriter> writer = TraceWriter::open(store_dir, ss, mode);
  const int64_t start = writer->committed_samples();
  if (start > 0) log_info("resuming ", store_dir.string(), " after ", start, " committed samples");
  if (start > static_cast<int64_t>(items.size()))
    fail(store_dir.string(), ": the store holds more samples than this run plans");

  // Tokenizer thread: tokenizes window after window (at most two ahead) while the engine runs. A
  // window is one shard's samples, so batches (and with them the float rounding of every logit)
  // depend only on the plan: a resumed run or a rank of a data-parallel run (whose part starts at a
  // shard boundary) recomputes exactly the batches of one uninterrupted process. A resumed run
  // starts at the window of its first uncommitted sample and writes from that sample on.
  // With the GPU engine, tokenizing is spread over several threads (one would not keep up).
  const auto per_window = static_cast<size_t>(o.samples_per_shard);
  const size_t first_window = static_cast<size_t>(start) - static_cast<size_t>(start) % per_window;
  const unsigned tok_threads =
      on_gpu ? std::clamp(std::thread::hardware_concurrency(), 2u, 10u) - 1 : 1;
  auto tokenize = [&](size_t begin, size_t end) {
    auto run = [&](size_t t) {
      for (size_t k = begin + t; k < end; k += tok_threads) {
        WorkItem& w = items[k];
        if (w.text != nullptr) w.ids = tok.encode(*w.text, o.max_length);
      }
    };
    std::vector<std::exception_ptr> errors(tok_threads);
    auto guarded = [&](size_t t) {
      try {
        run(t);
      } catch (...) {
        errors[t] = std::current_exception();
      }
    };
    std::vector<std::thread> pool;
    for (size_t t = 1; t < tok_threads; ++t) pool.emplace_back(guarded, t);
    guarded(0);
    for (auto& th : pool) th.join();
    for (auto& e : errors) {
      if (e) std::rethrow_exception(e);
    }
  };
  HandOff<std::pair<size_t, size_t>> ready(2);  // [begin, end) windows of items
  std::exception_ptr producer_error;
  std::thread producer([&] {
    try {
      for (size_t i = first_window; i < items.size(); i += per_window) {
        const size_t end = std::min(items.size(), i + per_window);
        tokenize(i, end);
        if (!ready.push({i, end})) break;
      }
    } catch (...) {
      producer_error = std::current_exception();
    }
    ready.finish();
  });
  auto stop_producer = [&] {
    ready.stop();
    if (producer.joinable()) producer.join();
  };

  const double t_loop = progress_clock();
  const StopSignals stop_signals;
  Progress progress(static_cast<int64_t>(items.size()), start, L, o.progress);
  const bool want_hidden = o.hidden_dtype.has_value();
  BatchCapture cap(enc_layers, dec_layers, want_hidden);
  CollectResult result;
  double engine_seconds = 0, wait_seconds = 0, write_seconds = 0;  // where the loop's time goes
  // MOETRACE_FAULT_KILL_AFTER=N: SIGKILL this process right after the N-th sample of this run
  // reached the writer (tests kill runs at chosen points, between and inside shard commits).
  const char* fault = std::getenv("MOETRACE_FAULT_KILL_AFTER");
  const int64_t kill_after = fault != nullptr ? std::atoll(fault) : -1;
  int64_t added = 0;

  // A window of items from the tokenizer thread: its samples go to the writer, in store order,
  // once every batch made of it has come back from the engine.
  struct Window {
    size_t begin = 0;  // position of items.front() in the run's items
    std::vector<WorkItem> items;
    std::vector<SampleData> data;
    size_t outstanding = 0;  // batches submitted to the GPU pipeline, not yet delivered
    bool submitted = false;  // every batch of the window has been submitted
  };
  std::deque<Window> windows;  // references stay valid: only push_back and pop_front
  auto write_window = [&](Window& win) {
    std::vector<SampleRecord> records;
    std::deque<SyntheticSample> synthetic;  // owns what synthetic records point to
    for (size_t j = 0; j < win.items.size(); ++j) {
      if (win.begin + j < static_cast<size_t>(start)) continue;  // committed by an earlier run
      WorkItem& w = win.items[j];
      SampleRecord& r = records.emplace_back();
      r.sample_id = w.sample_id;
      r.dataset = w.dataset;
      r.row = w.row;
      r.synthetic = w.synthetic;
      if (w.synthetic) {
        const SyntheticSample& syn = synthetic.emplace_back(
            make_synthetic(o.seed, w.synthetic_index, L, E, o.max_length, cfg.vocab_size));
        r.token_ids = syn.token_ids;
        for (int64_t l = 0; l < L; ++l) {
          r.enc.push_back(LayerRecord{syn.logits[l].data(), syn.expert[l].data(),
                                      syn.dropped.data(), syn.gate[l].data(), nullptr});
        }
        // Synthetic samples have no decoder pass: zero steps.
        r.dec.assign(dec_layers.size(), LayerRecord{});
      } else {
        r.token_ids = std::move(w.ids);
        for (const LayerData& l : win.data[j].enc) r.enc.push_back(record_of(l));
        r.dec_input_ids = win.data[j].dec_in;
        r.dec_output_ids = win.data[j].dec_out;
        for (const LayerData& l : win.data[j].dec) r.dec.push_back(record_of(l));
      }
      result.tokens += static_cast<int64_t>(r.token_ids.size());
    }
    if (kill_after < 0) {
      writer->add(records);  // the whole window at once: copied in parallel
    } else {
      for (const SampleRecord& r : records) {
        writer->add(r);
        if (++added == kill_after) std::raise(SIGKILL);  // fault injection for the resume tests
      }
    }
    result.samples += static_cast<int64_t>(records.size());
  };
  // The store thread: finished windows reach the writer on their own thread (add() copies every
  // logit once more), so the engine loop does not wait for it; at most two windows wait for it.
  HandOff<Window> to_store(2);
  std::exception_ptr store_error;  // set before to_store.stop(), read after a failed push or join
  std::thread store_thread([&] {
    try {
      while (auto win = to_store.pop()) {
        const double t0 = progress_clock();
        write_window(*win);
        write_seconds += progress_clock() - t0;
      }
    } catch (...) {
      store_error = std::current_exception();
      to_store.stop();
    }
  });
  auto close_store = [&] {
    to_store.finish();
    if (store_thread.joinable()) store_thread.join();
  };
  auto write_finished_windows = [&] {
    while (!windows.empty() && windows.front().submitted && windows.front().outstanding == 0) {
      Window& win = windows.front();
      int64_t synthetic = 0;
      for (size_t j = 0; j < win.items.size(); ++j) {
        synthetic += win.items[j].synthetic && win.begin + j >= static_cast<size_t>(start);
      }
      if (!to_store.push(std::move(win))) std::rethrow_exception(store_error);
      windows.pop_front();
      progress.samples_skipped(synthetic);
    }
  };

#ifdef MOETRACE_WITH_CUDA
  // The GPU pipeline (encoder-only runs): batches are submitted without waiting; the observed
  // tensors come back in submit order in pinned memory while later batches compute.
  const bool pipelined = gpu != nullptr && !o.decoder;
  struct Ticket {
    Window* window;
    std::vector<size_t> members;
  };
  std::deque<Ticket> tickets;
  if (pipelined) {
    CaptureSpec spec;
    spec.gate = true;
    // F16 logits come over as they are; other store dtypes are made from exact F32.
    spec.logits_dtype = o.logits_dtype == DType::kF16 ? DType::kF16 : DType::kF32;
    spec.hidden = want_hidden;
    if (want_hidden) spec.hidden_dtype = *o.hidden_dtype;
    gpu->set_capture(spec);
  }
  auto deliver = [&](std::unique_ptr<CapturedBatch> r) {
    Ticket t = std::move(tickets.front());
    tickets.pop_front();
    // Every key is looked up (and checked) before the copies run in parallel over samples.
    std::map<std::string, TensorView> views;
    for (int i : enc_layers) {
      for (const char* f : {"router_logits", "expert", "dropped", "gate", "hidden"}) {
        if (std::string_view(f) == "hidden" && !want_hidden) continue;
        const std::string key = "enc." + std::to_string(i) + "." + f;
        const TensorView* v = r->find(key);
        if (v == nullptr) fail("GPU pipeline: no captured tensor ", key);
        views[key] = *v;
      }
    }
    auto get = [&](const std::string& key) -> const TensorView& { return views.at(key); };
#pragma omp parallel for schedule(dynamic, 8)
    for (int64_t b = 0; b < r->B; ++b) {
      const size_t j = t.members[static_cast<size_t>(b)];
      const auto len = static_cast<int64_t>(t.window->items[j].ids.size());
      for (int i : enc_layers) {
        t.window->data[j].enc.push_back(
            layer_slice(get, "enc." + std::to_string(i) + ".", b, r->S, len, E, d, want_hidden));
      }
    }
    int64_t real_tokens = 0;
    for (size_t j : t.members) real_tokens += static_cast<int64_t>(t.window->items[j].ids.size());
    progress.batch_done(r->B, real_tokens, t.window->items[t.members.front()].dataset);
    --t.window->outstanding;
  };
  auto drain = [&](bool wait) {
    if (!pipelined) return;
    const double t0 = progress_clock();
    while (auto r = gpu->poll(wait)) deliver(std::move(r));
    engine_seconds += progress_clock() - t0;
  };
#else
  auto drain = [](bool) {};
#endif

  try {
    while (true) {
      const double t0 = progress_clock();
      const std::optional<std::pair<size_t, size_t>> span = ready.pop();
      wait_seconds += progress_clock() - t0;
      if (!span) break;  // all windows done, or the tokenizer failed (rethrown after the join)
      Window& win = windows.emplace_back();
      win.begin = span->first;
      const size_t n = span->second - span->first;
      win.items.assign(
          std::make_move_iterator(items.begin() + static_cast<std::ptrdiff_t>(span->first)),
          std::make_move_iterator(items.begin() + static_cast<std::ptrdiff_t>(span->second)));
      win.data.resize(n);
      std::vector<size_t> real;
      for (size_t j = 0; j < n; ++j) {
        if (!win.items[j].synthetic) real.push_back(j);
      }
      // Batches run in the order of their first sample, not longest first: each batch's numbers
      // do not depend on when it runs, and the samples complete roughly in store order, so that
      // an interrupted run commits most of what it computed (the complete prefix of the window).
      auto batches = make_batches(win.items, real, batch_tokens);
      std::sort(batches.begin(), batches.end(), [](const auto& a, const auto& b) {
        return *std::min_element(a.begin(), a.end()) < *std::min_element(b.begin(), b.end());
      });
      for (auto& members : batches) {
        if (g_signal != 0) break;
        Batch batch;
        batch.B = static_cast<int64_t>(members.size());
        batch.S = static_cast<int64_t>(win.items[members.front()].ids.size());
        batch.input_ids.assign(static_cast<size_t>(batch.B * batch.S),
                               static_cast<int32_t>(cfg.pad_token_id));
        batch.attention_mask.assign(static_cast<size_t>(batch.B * batch.S), 0);
        for (int64_t b = 0; b < batch.B; ++b) {
          const auto& ids = win.items[members[static_cast<size_t>(b)]].ids;
          std::copy(ids.begin(), ids.end(), batch.input_ids.begin() + b * batch.S);
          std::fill_n(batch.attention_mask.begin() + b * batch.S, ids.size(), 1);
        }
        const double t0 = progress_clock();
#ifdef MOETRACE_WITH_CUDA
        if (pipelined) {
          // Keep every slot busy: take a finished batch back only when all are in flight.
          if (gpu->in_flight() == gpu->slots()) deliver(gpu->poll(true));
          gpu->submit(batch);
          tickets.push_back(Ticket{&win, std::move(members)});
          ++win.outstanding;
          engine_seconds += progress_clock() - t0;
          continue;
        }
#endif
        cap.clear();
        GenerateResult gen;
#ifdef MOETRACE_WITH_CUDA
        if (gpu) {
          gpu->encode(batch, &cap);
          if (o.decoder) gen = gpu->generate(batch, o.max_new_tokens, 0, &cap);
        } else
#endif
        {
          Tensor enc = model->encode(batch, &cap);
          if (o.decoder) gen = model->generate(enc, batch, o.max_new_tokens, 0, &cap);
        }
        engine_seconds += progress_clock() - t0;
        auto get = [&](const std::string& key) -> TensorView {
          return cap.get(key).front().view();
        };
        for (int64_t b = 0; b < batch.B; ++b) {
          const size_t j = members[static_cast<size_t>(b)];
          const int64_t len = static_cast<int64_t>(win.items[j].ids.size());
          SampleData& sd = win.data[j];
          for (int i : enc_layers) {
            sd.enc.push_back(layer_slice(get, "enc." + std::to_string(i) + ".", b, batch.S, len, E,
                                         d, want_hidden));
          }
          if (o.decoder) {
            // Steps until this sequence produced eos (inclusive), else all steps run.
            const int32_t* ids = gen.ids.data() + b * (gen.steps + 1);
            int64_t G = gen.steps;
            for (int64_t t = 1; t <= gen.steps; ++t) {
              if (ids[t] == cfg.eos_token_id) {
                G = t;
                break;
              }
            }
            sd.dec_in.assign(ids, ids + G);
            sd.dec_out.assign(ids + 1, ids + G + 1);
            for (int i : dec_layers) {
              sd.dec.push_back(
                  decoder_slice(cap, "dec." + std::to_string(i) + ".", b, G, E, d, want_hidden));
            }
          }
        }
        int64_t real_tokens = 0;
        for (size_t j : members) real_tokens += static_cast<int64_t>(win.items[j].ids.size());
        progress.batch_done(batch.B, real_tokens, win.items[members.front()].dataset);
      }
      if (g_signal != 0) break;
      win.submitted = true;
      drain(false);  // whatever the GPU has finished meanwhile, without waiting
      write_finished_windows();
    }
    // The rest of the GPU's work, then every window that is complete (after Ctrl-C the partly
    // submitted window stays unwritten: a resumed run redoes it).
    drain(true);
    write_finished_windows();
    if (g_signal != 0 && !windows.empty()) {
      // Stopped inside a window: its samples up to the first one still missing are complete
      // (batches run in the order of their first sample); they are committed, and a resumed run
      // recomputes the window's batches and writes from the next sample on.
      Window& win = windows.front();
      size_t done = 0;
      while (done < win.items.size() &&
             (win.items[done].synthetic || !win.data[done].enc.empty())) {
        ++done;
      }
      win.items.resize(done);
      win.data.resize(done);
      win.submitted = true;
      write_finished_windows();
    }
    close_store();
    if (store_error) std::rethrow_exception(store_error);
  } catch (...) {
    stop_producer();
    close_store();
    throw;
  }
  stop_producer();
  if (producer_error) std::rethrow_exception(producer_error);
  progress.finish();

  const double seconds = progress_clock() - t_start;
  result.seconds = seconds;
  result.loop_seconds = progress_clock() - t_loop;
  result.engine_seconds = engine_seconds;
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
  if (o.audit > 0) {  // --audit (collect/audit.h): the main engine goes before an fp32 one loads
    model.reset();
    AuditOptions ao;
    ao.fraction = o.audit;
    ao.min_samples = std::max<int64_t>(1, batch_tokens / o.max_length);  // one batch
    ao.batch_tokens = batch_tokens;
    ao.pad_token_id = static_cast<int32_t>(cfg.pad_token_id);
    ao.precision = on_gpu ? o.precision : "fp32";
    if (!on_gpu) ao.skip_reason = "the CPU engine computes in fp32: the stored routing is fp32's";
    if (on_gpu && o.precision == "fp32")
      ao.skip_reason = "--precision fp32: the stored routing is fp32's";
#ifdef MOETRACE_WITH_CUDA
    gpu.reset();
    audit_store(store_dir, ao, [&]() -> AuditEncode {
      CudaOptions co = cuda_options_for_precision("fp32");
      co.device = dev.index;
      std::shared_ptr<CudaSwitchModel> ref =
          CudaSwitchModel::from_source(cfg, mc.weights, LoadOptions{true}, co);
      return [ref](const Batch& b, Observer* obs) { ref->encode(b, obs); };
    });
#else
    audit_store(store_dir, ao, [] { return AuditEncode(); });
#endif
  }
  const double throughput =
      TraceStore::open(store_dir).manifest().value("throughput_tokens_per_s", 0.0);
  // One line with the numbers benchmarks read (scripts/gpu_check.sh): loop = after model load.
  log_info("timing: total ", fixed1(seconds), " s, loop ", result.loop_seconds, " s, engine ",
           engine_seconds, " s, ", result.tokens, " tokens; throughput ", fixed1(throughput),
           " tokens/s");
  log_info("loop breakdown: engine (submit, wait, copy out) ", engine_seconds,
           " s, waiting for the tokenizer ", wait_seconds, " s, handing samples to the store ",
           write_seconds, " s");
  print_collect_summary(store_dir, stderr);
  if (parallel) assemble_after_rank(o.output, launch);
  log_info("Output: ", store_dir.string(), " (", human_bytes(store_bytes(store_dir)), ")");
  return result;
}

}  // namespace moetrace
