#include "collect/collect.h"

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <deque>
#include <map>
#include <mutex>
#include <numeric>
#include <set>
#include <thread>

#include "collect/model_source.h"
#include "collect/progress.h"
#include "collect/synthetic.h"
#include "core/error.h"
#include "core/log.h"
#include "data/plan.h"
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

std::atomic<bool> g_interrupted{false};
extern "C" void on_sigint(int) { g_interrupted = true; }

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
struct LayerData {
  std::vector<float> logits, gate, hidden;
  std::vector<int32_t> expert;
  std::vector<uint8_t> dropped;
};
struct SampleData {
  std::vector<LayerData> enc, dec;
  std::vector<int32_t> dec_in, dec_out;
};

template <class T>
void copy_rows(const Tensor& t, int64_t row0, int64_t rows, int64_t width, std::vector<T>& out) {
  const T* src = t.data<T>() + row0 * width;
  out.assign(src, src + rows * width);
}

LayerData layer_slice(const BatchCapture& cap, const std::string& p, int64_t b, int64_t S,
                      int64_t len, int64_t E, int64_t d, bool hidden) {
  LayerData l;
  copy_rows(cap.get(p + "router_logits").front(), b * S, len, E, l.logits);
  copy_rows(cap.get(p + "expert").front(), b * S, len, 1, l.expert);
  copy_rows(cap.get(p + "dropped").front(), b * S, len, 1, l.dropped);
  copy_rows(cap.get(p + "gate").front(), b * S, len, 1, l.gate);
  if (hidden) copy_rows(cap.get(p + "hidden").front(), b * S, len, d, l.hidden);
  return l;
}

// Decoder layer of sample b over its first G steps (one [B,1,...] tensor per step).
LayerData decoder_slice(const BatchCapture& cap, const std::string& p, int64_t b, int64_t G,
                        int64_t E, int64_t d, bool hidden) {
  LayerData l;
  const auto& logits = cap.get(p + "router_logits");
  for (int64_t t = 0; t < G; ++t) {
    const float* r = logits[t].data<float>() + b * E;
    l.logits.insert(l.logits.end(), r, r + E);
    l.expert.push_back(cap.get(p + "expert")[t].data<int32_t>()[b]);
    l.dropped.push_back(cap.get(p + "dropped")[t].data<uint8_t>()[b]);
    l.gate.push_back(cap.get(p + "gate")[t].data<float>()[b]);
    if (hidden) {
      const float* h = cap.get(p + "hidden")[t].data<float>() + b * d;
      l.hidden.insert(l.hidden.end(), h, h + d);
    }
  }
  return l;
}

LayerRecord record_of(const LayerData& l) {
  return LayerRecord{l.logits.data(), l.expert.data(), l.dropped.data(), l.gate.data(),
                     l.hidden.empty() ? nullptr : l.hidden.data()};
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
  if (o.batch_tokens < o.max_length)
    fail("--batch-tokens ", o.batch_tokens, " must be >= --max-length ", o.max_length);
  if (o.resume && o.overwrite) fail("--resume and --overwrite exclude each other");
  if (o.device != "cpu" && o.device != "cuda")
    fail("--device '", o.device, "': expected cpu or cuda");
#ifndef MOETRACE_WITH_CUDA
  if (o.device == "cuda")
    fail("--device cuda: this moetrace was built without the CUDA backend (no nvcc found)");
#endif
  // Refuse an unusable output before any slow work (the writer checks again, fully).
  std::error_code ec;
  if (!o.resume && !o.overwrite && fs::is_directory(o.output, ec) && !fs::is_empty(o.output, ec)) {
    fail(o.output,
         ": is not empty; use --resume to continue a store of the same settings or --overwrite to "
         "replace it");
  }
  cpu::set_num_threads(o.threads);
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
  if (need_real && n_real_wanted > 0) {
    PlanOptions po;
    // The demo model reads the bundled rows unless told otherwise.
    po.datasets = !o.datasets.empty() ? o.datasets : mc.demo ? "demo" : "core";
    po.data_roots = o.data_roots;
    if (mc.demo && po.data_roots.empty()) po.data_roots.push_back(assets_dir() / "demo/data");
    po.extra_catalog = o.catalog;
    po.seed = o.seed;
    po.max_samples = n_real_wanted;
    po.threads = o.threads;
    PlanStats stats;
    plan = build_plan(po, &stats);
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
      {"datasets", !o.datasets.empty() ? o.datasets
                   : mc.demo           ? "demo"
                                       : "core"},
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
  ss.device = o.device == "cpu" ? cpu_description(threads) : "cuda:0 (" + o.precision + ")";
  const OpenMode mode = o.resume      ? OpenMode::kResume
                        : o.overwrite ? OpenMode::kOverwrite
                                      : OpenMode::kCreate;
  std::unique_ptr<TraceWriter> writer = TraceWriter::open(o.output, ss, mode);
  const int64_t start = writer->committed_samples();
  if (start > 0) log_info("resuming ", o.output, " after ", start, " committed samples");
  if (start > static_cast<int64_t>(items.size()))
    fail(o.output, ": the store holds more samples than this run plans");

  // The engine (model weights materialised once).
  LoadOptions lo;
  lo.encoder_only = !o.decoder;
  std::unique_ptr<SwitchModel> model;
#ifdef MOETRACE_WITH_CUDA
  std::unique_ptr<CudaSwitchModel> gpu;
  if (o.device == "cuda") {
    if (o.decoder)
      fail(
          "--decoder with --device cuda: the decoder runs on the CPU only for now (use --device "
          "cpu)");
    CudaOptions co;
    co.precision = o.precision == "fp32"   ? DType::kF32
                   : o.precision == "fp16" ? DType::kF16
                                           : DType::kBF16;
    if (o.precision != "bf16" && o.precision != "fp16" && o.precision != "fp32") {
      fail("--precision '", o.precision, "': expected bf16, fp16 or fp32");
    }
    gpu = CudaSwitchModel::from_source(cfg, mc.weights, lo, co);
    log_info("model on the GPU in ", gpu->load_seconds(), " s (", gpu->device_bytes() >> 20,
             " MiB)");
  } else {
    model = SwitchModel::from_source(cfg, mc.weights, lo);
  }
#else
  model = SwitchModel::from_source(cfg, mc.weights, lo);
#endif
  if (mc.demo) {
    log_warn("demo model: seeded random weights in the switch-base layout (", cfg.num_layers,
             " layers, d_model ", cfg.d_model, ", ", E,
             " experts); its routing is not a trained model's");
  }

  // Tokenizer thread: tokenizes window after window (at most two ahead) while the engine runs.
  const int64_t window_tokens = std::max<int64_t>(4 * o.batch_tokens, 16384);
  std::mutex mu;
  std::condition_variable cv;
  std::deque<std::pair<size_t, size_t>> ready;  // [begin, end) windows of items
  bool producer_done = false, consumer_done = false;
  std::exception_ptr producer_error;
  std::thread producer([&] {
    try {
      size_t i = static_cast<size_t>(start);
      while (i < items.size()) {
        size_t end = i;
        int64_t tokens = 0;
        while (end < items.size() && tokens < window_tokens) {
          WorkItem& w = items[end++];
          if (w.text != nullptr) w.ids = tok.encode(*w.text, o.max_length);
          tokens += w.text != nullptr ? static_cast<int64_t>(w.ids.size()) : o.max_length / 2;
        }
        std::unique_lock<std::mutex> lock(mu);
        cv.wait(lock, [&] { return ready.size() < 2 || consumer_done; });
        if (consumer_done) break;
        ready.emplace_back(i, end);
        cv.notify_all();
        i = end;
      }
    } catch (...) {
      producer_error = std::current_exception();
    }
    std::lock_guard<std::mutex> lock(mu);
    producer_done = true;
    cv.notify_all();
  });
  auto stop_producer = [&] {
    {
      std::lock_guard<std::mutex> lock(mu);
      consumer_done = true;
    }
    cv.notify_all();
    if (producer.joinable()) producer.join();
  };

  const double t_loop = progress_clock();
  g_interrupted = false;
  auto previous_handler = std::signal(SIGINT, on_sigint);
  Progress progress(static_cast<int64_t>(items.size()), start, L, o.progress);
  const bool want_hidden = o.hidden_dtype.has_value();
  BatchCapture cap(enc_layers, dec_layers, want_hidden);
  CollectResult result;
  double engine_seconds = 0;
  // MOETRACE_FAULT_KILL_AFTER=N: SIGKILL this process right after the N-th sample of this run
  // reached the writer (tests kill runs at chosen points, between and inside shard commits).
  const char* fault = std::getenv("MOETRACE_FAULT_KILL_AFTER");
  const int64_t kill_after = fault != nullptr ? std::atoll(fault) : -1;
  int64_t added = 0;
  try {
    while (true) {
      std::pair<size_t, size_t> win;
      {
        std::unique_lock<std::mutex> lock(mu);
        cv.wait(lock, [&] { return !ready.empty() || producer_done; });
        if (ready.empty()) break;
        win = ready.front();
        ready.pop_front();
      }
      cv.notify_all();
      if (producer_error) std::rethrow_exception(producer_error);
      const size_t n = win.second - win.first;
      std::vector<WorkItem> window(
          std::make_move_iterator(items.begin() + static_cast<std::ptrdiff_t>(win.first)),
          std::make_move_iterator(items.begin() + static_cast<std::ptrdiff_t>(win.second)));
      std::vector<SampleData> data(n);
      std::vector<size_t> real;
      for (size_t j = 0; j < n; ++j) {
        if (!window[j].synthetic) real.push_back(j);
      }
      for (const auto& members : make_batches(window, real, o.batch_tokens)) {
        if (g_interrupted) break;
        Batch batch;
        batch.B = static_cast<int64_t>(members.size());
        batch.S = static_cast<int64_t>(window[members.front()].ids.size());
        batch.input_ids.assign(static_cast<size_t>(batch.B * batch.S),
                               static_cast<int32_t>(cfg.pad_token_id));
        batch.attention_mask.assign(static_cast<size_t>(batch.B * batch.S), 0);
        for (int64_t b = 0; b < batch.B; ++b) {
          const auto& ids = window[members[static_cast<size_t>(b)]].ids;
          std::copy(ids.begin(), ids.end(), batch.input_ids.begin() + b * batch.S);
          std::fill_n(batch.attention_mask.begin() + b * batch.S, ids.size(), 1);
        }
        cap.clear();
        const double t0 = progress_clock();
        GenerateResult gen;
#ifdef MOETRACE_WITH_CUDA
        if (gpu) {
          gpu->encode(batch, &cap);
        } else
#endif
        {
          Tensor enc = model->encode(batch, &cap);
          if (o.decoder) gen = model->generate(enc, batch, o.max_new_tokens, 0, &cap);
        }
        engine_seconds += progress_clock() - t0;
        for (int64_t b = 0; b < batch.B; ++b) {
          const size_t j = members[static_cast<size_t>(b)];
          const int64_t len = static_cast<int64_t>(window[j].ids.size());
          SampleData& sd = data[j];
          for (int i : enc_layers) {
            sd.enc.push_back(layer_slice(cap, "enc." + std::to_string(i) + ".", b, batch.S, len, E,
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
        progress.batch_done(batch.B, batch.B * batch.S, window[members.front()].dataset);
      }
      if (g_interrupted) break;
      // Store order.
      for (size_t j = 0; j < n; ++j) {
        WorkItem& w = window[j];
        SampleRecord r;
        r.sample_id = w.sample_id;
        r.dataset = w.dataset;
        r.row = w.row;
        r.synthetic = w.synthetic;
        SyntheticSample syn;
        if (w.synthetic) {
          syn = make_synthetic(o.seed, w.synthetic_index, L, E, o.max_length, cfg.vocab_size);
          r.token_ids = syn.token_ids;
          for (int64_t l = 0; l < L; ++l) {
            r.enc.push_back(LayerRecord{syn.logits[l].data(), syn.expert[l].data(),
                                        syn.dropped.data(), syn.gate[l].data(), nullptr});
          }
          // Synthetic samples have no decoder pass: zero steps.
          r.dec.assign(dec_layers.size(), LayerRecord{});
        } else {
          r.token_ids = w.ids;
          for (const LayerData& l : data[j].enc) r.enc.push_back(record_of(l));
          r.dec_input_ids = data[j].dec_in;
          r.dec_output_ids = data[j].dec_out;
          for (const LayerData& l : data[j].dec) r.dec.push_back(record_of(l));
        }
        writer->add(r);
        result.tokens += static_cast<int64_t>(r.token_ids.size());
        if (++added == kill_after) std::raise(SIGKILL);  // fault injection for the resume tests
        if (w.synthetic) progress.samples_skipped(1);
      }
      result.samples += static_cast<int64_t>(n);
    }
  } catch (...) {
    stop_producer();
    std::signal(SIGINT, previous_handler);
    throw;
  }
  stop_producer();
  if (producer_error) std::rethrow_exception(producer_error);
  std::signal(SIGINT, previous_handler);
  progress.finish();

  const double seconds = progress_clock() - t_start;
  result.seconds = seconds;
  result.loop_seconds = progress_clock() - t_loop;
  result.engine_seconds = engine_seconds;
  result.traces = result.samples * L;
  if (g_interrupted) {
    writer->commit_partial();
    result.interrupted = true;
    std::fprintf(stderr,
                 "\nmoetrace: interrupted; %lld samples are committed in %s. Continue with the "
                 "same command plus "
                 "--resume.\n",
                 static_cast<long long>(writer->durable_samples()), o.output.c_str());
    writer.reset();
    return result;
  }
  writer->finish(seconds);
  writer.reset();
  log_info("engine ", engine_seconds, " s of ", seconds, " s in collect");
  print_collect_summary(o.output, stderr);
  return result;
}

}  // namespace moetrace
