#include "collect/collect.h"

#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <charconv>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <fstream>
#include <numeric>
#include <optional>
#include <thread>

#include "collect/audit.h"
#include "collect/model_source.h"
#include "collect/pipeline.h"
#include "collect/progress.h"
#include "core/error.h"
#include "core/keys.h"
#include "core/log.h"
#include "data/catalog.h"
#include "data/plan.h"
#include "engine/engine.h"
#include "kernels/cpu/blas_info.h"
#include "kernels/cpu/ops.h"
#include "model/engine_io.h"
#include "text/text_tokenizer.h"
#include "trace/store.h"

namespace moetrace {

namespace fs = std::filesystem;
using json = nlohmann::json;
using namespace pipeline;  // the stages: plan, tokenize, batch, engine, capture, store

bool mixed_is_real(int64_t k, double ratio) {
  return std::floor(static_cast<double>(k + 1) * ratio) >
         std::floor(static_cast<double>(k) * ratio);
}

LogitsOption parse_logits_option(std::string_view value) {
  LogitsOption r;
  constexpr std::string_view kTopk = "topk:";
  auto is_topk = [&] {  // case-insensitive, as the dtype names
    if (value.size() < kTopk.size()) return false;
    for (size_t i = 0; i < kTopk.size(); ++i) {
      if (std::tolower(static_cast<unsigned char>(value[i])) != kTopk[i]) return false;
    }
    return true;
  };
  if (is_topk()) {
    const std::string_view k = value.substr(kTopk.size());
    int v = 0;
    const auto [end, ec] = std::from_chars(k.data(), k.data() + k.size(), v);
    if (k.empty() || ec != std::errc() || end != k.data() + k.size() || v < 1) {
      fail("--logits '", value, "': topk:K needs a whole number K >= 1 (e.g. topk:8)");
    }
    r.dtype = DType::kF16;  // the top-K values' dtype
    r.topk = v;
    return r;
  }
  try {
    r.dtype = parse_dtype_option("--logits", value, {DType::kF32, DType::kF16, DType::kBF16});
  } catch (const Error& e) {
    fail(e.what(),
         ", or topk:K (the K largest logits per token, their experts and the "
         "log-sum-exp)");
  }
  return r;
}

namespace {

// The signal (SIGINT or SIGTERM) that asked the run to stop, 0 while none did.
std::atomic<int> g_signal{0};

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
  if (key == "batch_overhead_tokens") return "--batch-overhead";
  if (key == "device") return "--device";
  if (key == "threads") return "--threads";
  if (key == "batch_tokens") return "--batch-tokens";
  if (key == "batch_window") return "--batch-window";
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
  if (o.batch_overhead && *o.batch_overhead < 0)
    fail("--batch-overhead ", *o.batch_overhead, ": expected 0 or more tokens");
  if (!(o.audit >= 0 && o.audit <= 1)) fail("--audit ", o.audit, ": expected a fraction in [0, 1]");
  precision_mode(o.precision, "--precision");  // the one list of precision names
  if (o.decoder && o.max_new_tokens < 1)
    fail("--max-new-tokens ", o.max_new_tokens, ": expected at least 1 with --decoder");
  if (o.samples_per_shard < 1)
    fail("--samples-per-shard ", o.samples_per_shard, ": expected at least 1");
  if (o.batch_window < 0 || o.batch_window % o.samples_per_shard != 0)
    fail("--batch-window ", o.batch_window,
         ": expected a positive multiple of --samples-per-shard ", o.samples_per_shard,
         " (or 0: automatic)");
}

// The ids collect needs of a model: the padding of its batches (any id in the vocabulary; the
// attention mask hides it) and the vocabulary size.
struct ModelIds {
  int32_t pad = 0;
  int64_t vocab_size = 0;
};
ModelIds model_ids(const ModelChoice& mc) {
  if (!mc.lm) return {static_cast<int32_t>(mc.config.pad_token_id), mc.config.vocab_size};
  const LmConfig& c = *mc.lm;
  int64_t pad = c.pad_token_id;
  if (pad < 0 && !c.eos_token_ids.empty()) pad = c.eos_token_ids.front();
  if (pad < 0 || pad >= c.vocab_size) pad = 0;
  return {static_cast<int32_t>(pad), c.vocab_size};
}

// What collect captures of a model: its MoE layers (Switch: the encoder's, the decoder's with
// --decoder; a language model: its prompt's, its generated tokens' with --decoder), their keys and
// widths.
CaptureLayout capture_layout(const CollectOptions& o, const ModelChoice& mc) {
  CaptureLayout layout;
  layout.hidden = o.hidden_dtype.has_value();
  layout.logits_topk = o.logits_topk;
  if (mc.lm) {
    const LmConfig& c = *mc.lm;
    layout.prompt_stack = keys::Stack::kLm;
    layout.gen_stack = keys::Stack::kGen;
    layout.enc_layers = c.sparse_layers();
    if (o.decoder) layout.dec_layers = layout.enc_layers;
    layout.top_k = c.top_k;
    layout.dropped = false;  // no expert capacity
    layout.E = c.num_experts;
    layout.d = c.hidden_size;
    layout.eos = -1;  // greedy generation never picks an eos id (model/lm/lm_model.h)
    if (layout.enc_layers.empty()) fail(mc.id, ": the model has no MoE layers: nothing to trace");
    return layout;
  }
  const SwitchConfig& cfg = mc.config;
  layout.enc_layers = cfg.sparse_encoder_blocks();
  if (o.decoder) layout.dec_layers = cfg.sparse_decoder_blocks();
  layout.E = cfg.num_experts;
  layout.d = cfg.d_model;
  layout.eos = static_cast<int32_t>(cfg.eos_token_id);
  if (layout.enc_layers.empty())
    fail(mc.id, ": the model has no sparse encoder layers: nothing to trace");
  return layout;
}

// ---- the batching window (docs/TRACE_FORMAT.md, "Batching windows") ----------------------------

// The window of the store whose manifest is m (at `what`): engine.batch_window, or one shard of
// `shard` samples for a store written before that field (every window was one shard). A value that
// is not whole shards is refused.
int64_t manifest_batch_window(const json& m, int64_t shard, const std::string& what) {
  const json e = m.value("engine", json());
  if (!e.is_object() || !e.contains("batch_window")) return shard;
  const json& w = e["batch_window"];
  if (!w.is_number_integer() || w.get<int64_t>() < 1 || w.get<int64_t>() % shard != 0)
    fail(what, ": engine.batch_window must be a positive multiple of samples_per_shard ", shard,
         ", got ", w.dump(), "; the store is damaged, use --overwrite");
  return w.get<int64_t>();
}

// The window a resumed store was collected with (manifest_batch_window). nullopt: nothing to
// resume, or a manifest the resume checks refuse anyway.
std::optional<int64_t> stored_batch_window(const fs::path& dir, const CollectOptions& o) {
  std::error_code ec;
  const fs::path path = dir / "manifest.json";
  if (!o.resume || !fs::exists(path, ec)) return std::nullopt;
  std::ifstream in(path);
  const json m = json::parse(in, nullptr, false);
  if (m.is_discarded() || !m.is_object()) return std::nullopt;
  const json shard = m.value("samples_per_shard", json());
  if (!shard.is_number_integer() || shard.get<int64_t>() < 1) return std::nullopt;
  return manifest_batch_window(m, shard.get<int64_t>(), path.string());
}

// --batch-window: as given; resuming without it, the store's; else default_batch_window().
int64_t batch_window(const CollectOptions& o, const CaptureLayout& c, bool cuda,
                     const fs::path& dir) {
  const std::optional<int64_t> stored = stored_batch_window(dir, o);  // checked either way
  if (o.batch_window > 0) return o.batch_window;
  if (stored) return *stored;
  return default_batch_window(o, c, cuda);
}

StoreSettings store_settings(const CollectOptions& o, const ModelChoice& mc,
                             const TextTokenizer& tok, const Plan& plan,
                             const CaptureLayout& layout, const DeviceChoice& dev,
                             const BatchBudget& budget, int64_t window) {
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
  ss.logits_topk = o.logits_topk;
  if (mc.lm) {  // the manifest's routing object (docs/TRACE_FORMAT.md)
    ss.family = std::string(lm_family_name(mc.lm->family));
    ss.top_k = static_cast<int>(layout.top_k);
    ss.dropped = layout.dropped;
  }
  if (o.logits_topk > 0) ss.settings["logits_topk"] = o.logits_topk;  // absent: every logit
  ss.hidden_dtype = o.hidden_dtype;
  ss.decoder = o.decoder;
  ss.samples_per_shard = o.samples_per_shard;
  const int threads = cpu::num_threads();
  ss.device = dev.cuda ? dev.name() + " (" + o.precision + ")" : cpu_description(threads);
  // What changes the numbers besides the settings: a resume must match it (check_resume_engine).
  ss.engine = {{"device", dev.cuda ? "cuda" : "cpu"},
               {"batch_tokens", budget.tokens},
               {"batch_overhead_tokens", budget.overhead_tokens},
               {"batch_window", window}};
  if (dev.cuda) {
    ss.engine["precision"] = o.precision;
  } else {
    if (precision_mode(o.precision).beyond_operands())
      log_info("--precision ", o.precision, ": the CPU engine computes everything in fp32, so ",
               o.precision, " is fp32");
    ss.engine["precision"] = "fp32";
    ss.engine["threads"] = threads;
    ss.engine["blas"] = cpu::blas_config();
  }
  return ss;
}

// A rank collects its block of the global plan (settings.num_samples stays global).
void take_part(Plan& plan, StoreSettings& ss, const CollectOptions& o, int64_t window) {
  const LaunchInfo& launch = o.launch;
  ss.part =
      plan_part(static_cast<int64_t>(plan.items.size()), window, launch.rank, launch.world_size);
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
                        int64_t window, const CollectOptions& o, bool parallel) {
  std::error_code ec;
  if (!o.resume || !fs::exists(dir / "manifest.json", ec)) return false;
  const json m = check_resume(dir, ss);
  const int64_t have = m.value("num_samples", int64_t{0});
  if (m.value("complete", false) && have >= planned_here) {
    log_info(dir.string(), ": already complete (", have, " samples, ",
             m.value("total_traces", int64_t{0}), " traces); nothing to do");
    return true;
  }
  // Only an engine that computes new samples must match the store's, its window included (one
  // shard for a store written before engine.batch_window).
  json engine = m.value("engine", json());
  if (engine.is_object())
    engine["batch_window"] =
        manifest_batch_window(m, o.samples_per_shard, (dir / "manifest.json").string());
  check_resume_engine(dir, engine, ss.engine);
  // Extending a store past the end of the plan that wrote it: that plan's last window was cut
  // short, so the samples of it in the store were batched otherwise than this plan batches them;
  // they are computed again, from the window's first shard (docs/TRACE_FORMAT.md).
  const json& had = m.contains("settings") ? m["settings"] : json();
  const int64_t planned = had.is_object() ? had.value("num_samples", int64_t{-1}) : -1;
  const int64_t cut = planned % window;
  if (!parallel && planned > 0 && planned < planned_here && cut != 0 && have > planned - cut)
    ss.redo_from_sample = planned - cut;
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

}  // namespace

CollectResult run_collect(const CollectOptions& o) {
  check_options(o);
  // The device first: `--device cuda` without a GPU fails before any slow work or any file.
  const LaunchInfo& launch = o.launch;
  const DeviceChoice dev = resolve_device(o.device, launch.local_rank);
  // Batch budget: the GPU wants large batches (128 × 256 fills an H100/H200), the CPU cache-sized
  // ones.
  const BatchBudget budget{
      o.batch_tokens > 0 ? o.batch_tokens
      : dev.cuda         ? kDefaultBatchTokensCuda
                         : kDefaultBatchTokensCpu,
      o.batch_overhead.value_or(dev.cuda ? kBatchOverheadTokensCuda : kBatchOverheadTokensCpu)};
  if (budget.tokens < o.max_length)
    fail("--batch-tokens ", budget.tokens, " must be >= --max-length ", o.max_length);
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
  const ModelIds ids = model_ids(mc);
  if (mc.lm && o.mode != "real")
    fail("--mode ", o.mode, ": ", mc.id,
         " is a language model; synthetic samples exist for Switch models only (use --mode real)");
  const std::unique_ptr<TextTokenizer> tok = load_model_tokenizer(mc, o.tokenizer);
  const CaptureLayout layout = capture_layout(o, mc);
  const auto L = static_cast<int64_t>(layout.enc_layers.size());
  Plan plan = plan_samples(o, mc, L);

  // The store's settings; a rank's part; a resume checked before the engine starts.
  const int64_t window = batch_window(o, layout, dev.cuda, store_dir);
  StoreSettings ss = store_settings(o, mc, *tok, plan, layout, dev, budget, window);
  if (parallel) take_part(plan, ss, o, window);
  std::vector<WorkItem>& items = plan.items;
  if (check_resume_store(store_dir, ss, static_cast<int64_t>(items.size()), window, o, parallel)) {
    if (parallel) assemble_after_rank(o.output, launch);
    return CollectResult{};
  }

  // The engine (model weights materialised once), before the store is opened: a failed start
  // leaves the store as it was.
  EngineOptions eo;
  eo.device = dev;  // --device cuda:N, else the local rank's GPU
  const PrecisionMode pm = precision_mode(o.precision);
  eo.precision = dev.cuda ? pm.operands : DType::kF32;
  eo.fp32_routing = dev.cuda && pm.fp32_routing;
  eo.attention_pairs = dev.cuda && pm.attention_pairs;
  eo.load.encoder_only = !o.decoder;
  const double t_load = progress_clock();
  std::unique_ptr<Engine> engine =
      mc.lm ? make_lm_engine(eo, mc.dir) : make_engine(eo, mc.config, mc.weights);
  const Engine::Memory mem = engine->memory();
  // The seed's "Model loaded successfully!", with what a user checks first.
  log_info("model loaded: ", mc.id, " on ", ss.device, ", ", human_bytes(mem.bytes), " ", mem.what,
           ", in ", fixed1(progress_clock() - t_load), " s");
  if (mc.demo) {
    log_warn("demo model: seeded random weights in the switch-base layout (", mc.config.num_layers,
             " layers, d_model ", mc.config.d_model, ", ", layout.E,
             " experts); its routing is not a trained model's");
  }

  std::unique_ptr<TraceWriter> writer = TraceWriter::open(store_dir, ss, mode);
  const int64_t start = writer->committed_samples();
  if (start > 0) log_info("resuming ", store_dir.string(), " after ", start, " committed samples");
  if (start > static_cast<int64_t>(items.size()))
    fail(store_dir.string(), ": the store holds more samples than this run plans");

  // The stages. A resumed run starts at the window of its first uncommitted sample and writes from
  // that sample on.
  if (window != o.samples_per_shard)
    log_info("batching windows of ", window, " samples (", window / o.samples_per_shard,
             " shards)");
  const auto per_window = static_cast<size_t>(window);
  const size_t first_window = static_cast<size_t>(start) - static_cast<size_t>(start) % per_window;
  const unsigned tok_threads =
      dev.cuda ? std::clamp(std::thread::hardware_concurrency(), 2u, 10u) - 1 : 1;
  TokenizeStage tokenize(items, *tok, o.max_length, first_window, per_window, tok_threads);
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
  sp.vocab_size = ids.vocab_size;
  sp.dec_layers = layout.dec_layers.size();
  sp.logits_topk = o.logits_topk;
  // MOETRACE_FAULT_KILL_AFTER=N: SIGKILL this process right after the N-th sample of this run
  // reached the writer, the shards filled before it committed (tests kill runs at chosen points,
  // between and inside shard commits).
  const char* fault = std::getenv("MOETRACE_FAULT_KILL_AFTER");
  sp.kill_after = fault != nullptr ? std::atoll(fault) : -1;
  StoreStage store(*writer, sp);
  LoopResult lr;
  try {
    // A language model generates from equal-length batches (model/lm/lm_engine.h).
    lr = run_windows(items, tokenize, engine_stage, store, progress, budget, ids.pad,
                     mc.lm && o.decoder, start, g_signal);
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
  if (o.audit > 0) {  // --audit (collect/audit.h): the main engine goes before an fp32 one loads
    engine.reset();
    AuditOptions ao;
    ao.fraction = o.audit;
    ao.min_samples = std::max<int64_t>(1, budget.tokens / o.max_length);  // one batch
    ao.batches = budget;
    ao.pad_token_id = ids.pad;
    ao.precision = dev.cuda ? o.precision : "fp32";
    if (!dev.cuda) ao.skip_reason = "the CPU engine computes in fp32: the stored routing is fp32's";
    if (dev.cuda && o.precision == "fp32")
      ao.skip_reason = "--precision fp32: the stored routing is fp32's";
    audit_store(store_dir, ao, [&]() -> AuditEncode {
      EngineOptions ref_options = eo;
      ref_options.precision = DType::kF32;
      ref_options.fp32_routing = false;
      ref_options.attention_pairs = false;
      ref_options.load.encoder_only = true;
      std::shared_ptr<Engine> ref = mc.lm ? make_lm_engine(ref_options, mc.dir)
                                          : make_engine(ref_options, mc.config, mc.weights);
      return [ref](const Batch& b, Observer* obs) { ref->encode(b, obs); };
    });
  }
  const double throughput =
      TraceStore::open(store_dir).manifest().value("throughput_tokens_per_s", 0.0);
  // One line with the numbers benchmarks read (scripts/gpu_check.sh): loop = after model load.
  log_info("timing: total ", fixed1(result.seconds), " s, loop ", result.loop_seconds,
           " s, engine ", result.engine_seconds, " s, ", result.tokens, " tokens; throughput ",
           fixed1(throughput), " tokens/s");
  log_info("loop breakdown: engine (submit, wait, copy out) ", result.engine_seconds,
           " s, waiting for the tokenizer ", lr.wait_seconds, " s, handing samples to the store ",
           store.seconds(), " s");
  if (engine_stage.batches() > 0) {  // what --batch-window, --batch-tokens and --batch-overhead did
    const double padded = static_cast<double>(engine_stage.padded_tokens());
    log_info("batches: ", engine_stage.batches(), " from windows of ", window, " samples, ",
             engine_stage.padded_tokens(), " prompt tokens computed, padding ",
             fixed1(100.0 * (padded - static_cast<double>(engine_stage.real_tokens())) / padded),
             "%");
  }
  print_collect_summary(store_dir, stderr);
  if (parallel) assemble_after_rank(o.output, launch);
  log_info("Output: ", store_dir.string(), " (", human_bytes(store_bytes(store_dir)), ")");
  return result;
}

}  // namespace moetrace
