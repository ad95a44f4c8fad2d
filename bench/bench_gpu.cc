// GPU engine benchmark (docs/PERFORMANCE.md, "GPU"): switch-base-N shape with random weights, the
// encoder through the capture pipeline (router logits fp16 + experts + drops to pinned host memory,
// a writer thread copying every batch out as a store would), per shape:
//   1x128, 32x256, 128x256 (random ids) and the real-text mix (the file bench/hf_switch_bench.py
//   --write-mix writes: one sample per line, T5 ids), 128 samples per batch after sorting by
//   length; `mix-collect`: the same texts batched as `moetrace collect` batches them (windows of
//   1024 samples in mix order: one shard of collect's default --samples-per-shard, its window
//   before --batch-window; length_batches of model/engine_io.h with --batch-tokens and
//   --batch-overhead), the mix repeated to --mix-windows windows so that the pipeline stays full;
//   `mix-collect@W`: windows of W samples (the same samples in all; `mix-collect@4096` is collect's
//   default window on CUDA for this shape); `mix-collect-greedy[@W]`: the baseline, collect's rule
//   before the cost model (each batch filled from its longest sample up to --batch-tokens).
// Also: the bf16 matrix-product ceiling of this GPU (cuBLASLt 8192³), the achieved fraction of it,
// GPU memory, and with --parity N the bf16-vs-CPU-fp32 routing comparison on N real samples.
// With --generate N: greedy generation (encode + generate(N, min N), the decoder's router logits
// and experts offered to a host observer every step, as `collect --decoder` captures them) per
// batch size of --generate-batches (default 1,32,128) on random prompts of --generate-prompt
// tokens (default 64); decoder tokens/s = B x N / the median seconds of encode + generate. The
// model is then loaded with its decoder; --shapes '' skips the encoder rows.
// Prints a table; --json writes everything with the date and the GPU.
#include <cuda_profiler_api.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <deque>
#include <fstream>
#include <map>
#include <mutex>
#include <nlohmann/json.hpp>
#include <numeric>
#include <optional>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "bench_util.h"
#include "core/error.h"
#include "core/keys.h"
#include "kernels/cuda/blas.h"
#include "kernels/cuda/common.h"
#include "model/cuda/cuda_switch_model.h"
#include "model/cuda/hf_init_weights.h"
#include "model/engine_io.h"
#include "model/random_weights.h"
#include "model/recording_observer.h"
#include "model/switch_model.h"
#include "trace/store.h"

namespace moetrace {
namespace {

struct Args {
  int64_t experts = 128;
  std::string model;  // --model switch-base-N | switch-large-N (published_config); else --experts
  DType precision = DType::kBF16;       // of the GEMM operands
  std::string precision_name = "bf16";  // --precision, as parse_precision_option spells it
  std::string json, mix = "/tmp/moetrace_mix.txt",
                    shapes =
                        "1x128,32x256,128x256,mix,mix-collect-greedy,mix-collect,mix-collect-"
                        "greedy@4096,mix-collect@4096";
  double budget = 3.0;
  int parity = 0;
  bool ncu = false;
  std::string store;  // --store DIR: also collect the mix end to end into a real trace store
  int64_t batch_tokens = kDefaultBatchTokensCuda;     // mix-collect: collect's default on cuda
  int64_t batch_overhead = kBatchOverheadTokensCuda;  // mix-collect: collect's cost of a batch
  int64_t mix_windows = 16;  // mix-collect: windows of 1024 samples (the mix repeated)
  int64_t generate = 0;      // --generate N: greedy generation of N tokens
  std::string generate_batches = "1,32,128";  // --generate-batches
  int64_t generate_prompt = 64;               // --generate-prompt: prompt tokens per sequence
};

Args parse(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    const std::string k = argv[i];
    auto val = [&]() -> std::string {
      if (i + 1 >= argc) fail("bench_gpu: ", k, " needs a value");
      return argv[++i];
    };
    if (k == "--store")
      a.store = val();
    else if (k == "--experts")
      a.experts = std::stoll(val());
    else if (k == "--model")
      a.model = val();
    else if (k == "--precision") {
      a.precision_name = parse_precision_option("--precision", val());
      a.precision = cuda_options_for_precision(a.precision_name).precision;
    } else if (k == "--json")
      a.json = val();
    else if (k == "--mix")
      a.mix = val();
    else if (k == "--batch-tokens")
      a.batch_tokens = std::stoll(val());
    else if (k == "--batch-overhead")
      a.batch_overhead = std::stoll(val());
    else if (k == "--mix-windows")
      a.mix_windows = std::stoll(val());
    else if (k == "--shapes")
      a.shapes = val();
    else if (k == "--budget")
      a.budget = std::stod(val());
    else if (k == "--parity")
      a.parity = std::stoi(val());
    else if (k == "--ncu")
      a.ncu = true;
    else if (k == "--generate")
      a.generate = std::stoll(val());
    else if (k == "--generate-batches")
      a.generate_batches = val();
    else if (k == "--generate-prompt")
      a.generate_prompt = std::stoll(val());
    else
      fail("bench_gpu: unknown option ", k);
  }
  if (!a.model.empty() && !published_config(a.model))
    fail("bench_gpu: --model '", a.model, "': expected switch-base-<N> or switch-large-<N>");
  if (a.generate < 0 || a.generate > 8192)
    fail("bench_gpu: --generate ", a.generate, ": expected 0 (off) to 8192 new tokens");
  if (a.generate_prompt < 1) fail("bench_gpu: --generate-prompt: expected at least 1 token");
  return a;
}

std::vector<std::vector<int32_t>> read_mix(const std::string& path) {
  std::ifstream in(path);
  if (!in)
    fail(path, ": cannot open the mix file (write it with bench/hf_switch_bench.py --write-mix)");
  std::vector<std::vector<int32_t>> out;
  std::string line;
  while (std::getline(in, line)) {
    std::istringstream ss(line);
    std::vector<int32_t> ids;
    int32_t v;
    while (ss >> v) ids.push_back(v);
    if (!ids.empty()) out.push_back(std::move(ids));
  }
  return out;
}

Batch pad_batch(const std::vector<std::vector<int32_t>>& samples, size_t begin, size_t end) {
  Batch b;
  b.B = static_cast<int64_t>(end - begin);
  for (size_t i = begin; i < end; ++i)
    b.S = std::max<int64_t>(b.S, static_cast<int64_t>(samples[i].size()));
  for (size_t i = begin; i < end; ++i) {
    for (int64_t s = 0; s < b.S; ++s) {
      const bool real = s < static_cast<int64_t>(samples[i].size());
      b.input_ids.push_back(real ? samples[i][static_cast<size_t>(s)] : 0);
      b.attention_mask.push_back(real ? 1 : 0);
    }
  }
  return b;
}

std::vector<Batch> mix_batches(std::vector<std::vector<int32_t>> samples, int64_t per_batch) {
  std::stable_sort(samples.begin(), samples.end(),
                   [](const auto& a, const auto& b) { return a.size() < b.size(); });
  std::vector<Batch> out;
  for (size_t i = 0; i < samples.size(); i += static_cast<size_t>(per_batch))
    out.push_back(
        pad_batch(samples, i, std::min(samples.size(), i + static_cast<size_t>(per_batch))));
  return out;
}

// The baseline of mix-collect-greedy: collect's batches before the cost model of length_batches
// (longest first, each batch filled while batch size × its first length fits batch_tokens).
std::vector<std::vector<size_t>> greedy_length_batches(const std::vector<int64_t>& lengths,
                                                       int64_t batch_tokens) {
  std::vector<size_t> order(lengths.size());
  std::iota(order.begin(), order.end(), size_t{0});
  std::stable_sort(order.begin(), order.end(),
                   [&](size_t x, size_t y) { return lengths[x] > lengths[y]; });
  std::vector<std::vector<size_t>> batches;
  for (size_t i : order) {
    if (!batches.empty() &&
        static_cast<int64_t>(batches.back().size() + 1) * lengths[batches.back().front()] <=
            batch_tokens) {
      batches.back().push_back(i);
    } else {
      batches.push_back({i});
    }
  }
  return batches;
}

// The mix as collect batches it: the samples in mix order (repeated to `windows` windows of
// `per_window`), each window's samples in length buckets (length_batches, or with greedy the
// baseline rule).
std::vector<Batch> collect_batches(const std::vector<std::vector<int32_t>>& mix, int64_t windows,
                                   int64_t per_window, const BatchBudget& budget, bool greedy) {
  std::vector<Batch> out;
  for (int64_t w = 0; w < windows; ++w) {
    std::vector<std::vector<int32_t>> win;
    std::vector<int64_t> lengths;
    for (int64_t i = 0; i < per_window; ++i) {
      win.push_back(mix[static_cast<size_t>(w * per_window + i) % mix.size()]);
      lengths.push_back(static_cast<int64_t>(win.back().size()));
    }
    for (const std::vector<size_t>& members :
         greedy ? greedy_length_batches(lengths, budget.tokens) : length_batches(lengths, budget)) {
      std::vector<std::vector<int32_t>> rows;
      for (size_t j : members) rows.push_back(win[j]);
      out.push_back(pad_batch(rows, 0, rows.size()));
    }
  }
  return out;
}

Batch random_batch(int64_t B, int64_t S, int64_t vocab, uint64_t seed) {
  std::mt19937_64 rng(seed);
  Batch b;
  b.B = B;
  b.S = S;
  for (int64_t i = 0; i < B * S; ++i) {
    b.input_ids.push_back(static_cast<int32_t>(2 + rng() % static_cast<uint64_t>(vocab - 2)));
    b.attention_mask.push_back(1);
  }
  return b;
}

// The store stand-in: a thread that copies every captured batch into per-sample records (what a
// trace writer does before compressing) and releases it.
class Writer {
 public:
  Writer() : th_([this] { run(); }) {}
  ~Writer() { finish(); }
  void push(std::unique_ptr<CapturedBatch> b) {
    {
      std::lock_guard<std::mutex> l(mu_);
      q_.push_back(std::move(b));
    }
    cv_.notify_one();
  }
  void finish() {
    {
      std::lock_guard<std::mutex> l(mu_);
      if (done_) return;
      done_ = true;
    }
    cv_.notify_one();
    th_.join();
  }
  size_t bytes() const { return bytes_; }

 private:
  void run() {
    std::vector<uint8_t> sample;
    for (;;) {
      std::unique_ptr<CapturedBatch> b;
      {
        std::unique_lock<std::mutex> l(mu_);
        cv_.wait(l, [&] { return done_ || !q_.empty(); });
        if (q_.empty()) return;
        b = std::move(q_.front());
        q_.pop_front();
      }
      for (int64_t i = 0; i < b->B; ++i)
        for (const auto& [k, v] : b->tensors) {
          const size_t per = v.nbytes() / static_cast<size_t>(b->B);
          sample.resize(per);
          std::memcpy(sample.data(),
                      static_cast<const uint8_t*>(v.data) + per * static_cast<size_t>(i), per);
          bytes_ += per;
        }
    }
  }
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::unique_ptr<CapturedBatch>> q_;
  bool done_ = false;
  std::atomic<size_t> bytes_{0};
  std::thread th_;
};

// What the pipeline hands back for every sparse encoder block: fp16 logits, experts, drops (and
// gates for a store).
KeyRequest pipeline_request(const SwitchConfig& c, bool gate) {
  KeyRequest r;
  for (int blk : c.sparse_encoder_blocks()) {
    auto k = [&](std::string_view f) { return keys::tensor(keys::Stack::kEncoder, blk, f); };
    r.add(k(keys::kRouterLogits), DType::kF16);
    r.add(k(keys::kExpert));
    r.add(k(keys::kDropped));
    if (gate) r.add(k(keys::kGate));
  }
  return r;
}

// Runs the batches through the pipeline once; returns wall seconds until the writer has all.
double run_pipeline(CudaSwitchModel& m, const std::vector<Batch>& batches,
                    const Observer& request) {
  const double t0 = bench::now_s();
  Writer w;
  for (const Batch& b : batches) {
    if (m.in_flight() == m.slots()) w.push(m.poll(true));
    m.submit(b, request);
  }
  while (auto r = m.poll(true)) w.push(std::move(r));
  w.finish();
  return bench::now_s() - t0;
}

// The seed job end to end into a real trace store: submit -> GPU -> pinned host -> TraceWriter
// (f16 logits widened, then stored as F16; shards committed on the writer's thread). Returns the
// seconds from the first submit until the manifest says complete.
uint64_t first_ticket_ = 0;

double run_into_store(CudaSwitchModel& m, const SwitchConfig& c, const std::string& model,
                      const std::vector<Batch>& batches, const std::string& dir) {
  const double t0 = bench::now_s();
  StoreSettings ss;
  ss.settings = {{"benchmark", "bench_gpu --store"}, {"samples", "the real-text mix"}};
  ss.model = {{"id", "random " + model + " (HF init, bf16)"}};
  ss.command_line = {"bench_gpu", "--store", dir};
  ss.enc_layers = c.sparse_encoder_blocks();
  ss.num_experts = c.num_experts;
  ss.d_model = c.d_model;
  ss.logits_dtype = DType::kF16;
  ss.device = "cuda:0";
  auto writer = TraceWriter::open(dir, ss, OpenMode::kOverwrite);
  const KeyRequest request = pipeline_request(c, true);
  const int64_t E = c.num_experts;
  int64_t sample = 0;
  std::vector<std::vector<float>> logits(ss.enc_layers.size());
  auto consume = [&](std::unique_ptr<CapturedBatch> r) {
    const Batch& b = batches[static_cast<size_t>(r->ticket - first_ticket_)];
    for (int64_t i = 0; i < r->B; ++i) {
      const int32_t* mask = b.attention_mask.data() + i * r->S;
      const int64_t len = std::accumulate(mask, mask + r->S, int64_t{0});
      SampleRecord rec;
      rec.sample_id = "mix/" + std::to_string(sample);
      rec.dataset = "mix";
      rec.row = sample++;
      rec.token_ids.assign(b.input_ids.begin() + i * r->S, b.input_ids.begin() + i * r->S + len);
      for (size_t l = 0; l < ss.enc_layers.size(); ++l) {
        const std::string p = keys::layer(keys::Stack::kEncoder, ss.enc_layers[l]) + ".";
        const TensorView* lg = r->find(p + "router_logits");
        logits[l].resize(static_cast<size_t>(len * E));
        convert_to_f32(lg->dtype, static_cast<const uint16_t*>(lg->data) + i * r->S * E,
                       logits[l].data(), logits[l].size());
        rec.enc.push_back(LayerRecord{logits[l].data(),
                                      r->find(p + "expert")->as<int32_t>() + i * r->S,
                                      r->find(p + "dropped")->as<uint8_t>() + i * r->S,
                                      r->find(p + "gate")->as<float>() + i * r->S, nullptr});
      }
      writer->add(rec);
    }
  };
  for (const Batch& b : batches) {
    if (m.in_flight() == m.slots()) consume(m.poll(true));
    const uint64_t t = m.submit(b, request);
    if (&b == &batches.front()) first_ticket_ = t;
  }
  while (auto r = m.poll(true)) consume(std::move(r));
  writer->finish(bench::now_s() - t0);
  return bench::now_s() - t0;
}

double flops_per_token(const SwitchConfig& c, double S) {
  const double d = c.d_model, inner = c.num_heads * c.d_kv, F = c.d_ff;
  double f = 0;
  for (int64_t i = 0; i < c.num_layers; ++i) {
    f += 2 * d * 3 * inner + 2 * inner * d + 4 * S * inner + 4 * d * F;
    if (c.encoder_block_sparse(i)) f += 2 * d * c.num_experts;
  }
  return f;
}

// cuBLASLt bf16 8192³, median of 5: this GPU's matrix-product ceiling.
double measure_peak_tflops() {
  const int64_t n = 8192;
  cuda::Stream s;
  cuda::Blas blas(s.get());
  cuda::DeviceBuffer a(n * n * 2), b(n * n * 2), c(n * n * 2);
  // Non-zero data (zeros run faster than real data).
  std::vector<uint16_t> host(static_cast<size_t>(n * n));
  std::mt19937 rng(1);
  for (auto& v : host) v = f32_to_bf16(static_cast<float>(rng() % 2001) / 1000.f - 1.f);
  cuda::upload(a.get(), host.data(), host.size() * 2);
  cuda::upload(b.get(), host.data(), host.size() * 2);
  cuda::GemmArgs g{n, n, n, a.get(), n, b.get(), n, c.get(), n, DType::kBF16, DType::kBF16};
  blas.gemm_nt(g);
  cuda::Event e0(true), e1(true);
  std::vector<double> t;
  for (int i = 0; i < 5; ++i) {
    e0.record(s.get());
    blas.gemm_nt(g);
    e1.record(s.get());
    e1.sync();
    float ms = 0;
    MT_CUDA_CHECK(cudaEventElapsedTime(&ms, e0.get(), e1.get()));
    t.push_back(ms / 1e3);
  }
  std::sort(t.begin(), t.end());
  return 2.0 * n * n * n / t[2] / 1e12;
}

size_t gpu_used_bytes() {
  size_t free_b = 0, total_b = 0;
  MT_CUDA_CHECK(cudaMemGetInfo(&free_b, &total_b));
  return total_b - free_b;
}

// The decoder's routing as `collect --decoder` keeps it: every step's router logits and experts
// copied out of the engine's pinned staging (what a writer does first).
class DecoderRouting : public Observer {
 public:
  bool wants(std::string_view key) const override {
    return key.rfind("dec.", 0) == 0 &&
           (key.ends_with(keys::kRouterLogits) || key.ends_with(keys::kExpert));
  }
  void observe(std::string_view, const TensorView& t) override {
    buf_.resize(t.nbytes());
    std::memcpy(buf_.data(), t.data, t.nbytes());
    bytes_ += t.nbytes();
  }
  size_t bytes() const { return bytes_; }

 private:
  std::vector<uint8_t> buf_;
  size_t bytes_ = 0;
};

// encode + generate(N, min N) per batch size: decoder tokens/s over the median of the repeats.
nlohmann::json generation(CudaSwitchModel& m, const SwitchConfig& c, const Args& a) {
  std::printf("\ngeneration: greedy, %lld new tokens (min = max), prompts of %lld random ids\n",
              static_cast<long long>(a.generate), static_cast<long long>(a.generate_prompt));
  std::printf("%-6s %8s %16s %12s %12s %10s\n", "batch", "repeats", "decoder tok/s", "ms/step",
              "s/call", "MB routed");
  nlohmann::json rows = nlohmann::json::array();
  std::stringstream list(a.generate_batches);
  std::string item;
  while (std::getline(list, item, ',')) {
    const int64_t B = std::stoll(item);
    if (B < 1) fail("bench_gpu: --generate-batches: '", item, "' is not a batch size");
    const Batch batch = random_batch(B, a.generate_prompt, c.vocab_size, 11);
    auto call = [&](DecoderRouting& obs) {
      const double t0 = bench::now_s();
      const Encoded enc = m.encode(batch, nullptr);
      const GenerateResult g = m.generate(enc, batch, a.generate, a.generate, &obs);
      if (g.steps != a.generate)
        fail("bench_gpu: generate made ", g.steps, " steps, expected ", a.generate);
      return bench::now_s() - t0;
    };
    DecoderRouting warm;
    call(warm);  // warm-up: the KV cache, buffers, plans
    std::vector<double> t;
    double total = 0;
    size_t routed = 0;
    while (t.size() < 3 || (total < a.budget && t.size() < 50)) {
      DecoderRouting obs;
      t.push_back(call(obs));
      total += t.back();
      routed = obs.bytes();
    }
    std::sort(t.begin(), t.end());
    const double med = t[t.size() / 2];
    const double tps = static_cast<double>(B * a.generate) / med;
    std::printf("%-6lld %8zu %16.0f %12.3f %12.4f %10.1f\n", static_cast<long long>(B), t.size(),
                tps, 1e3 * med / static_cast<double>(a.generate), med,
                static_cast<double>(routed) / 1e6);
    rows.push_back({{"batch", B},
                    {"prompt_tokens", a.generate_prompt},
                    {"new_tokens", a.generate},
                    {"repeats", t.size()},
                    {"median_seconds", med},
                    {"min_seconds", t.front()},
                    {"decoder_tokens_per_s", tps},
                    {"routing_bytes_per_call", routed}});
  }
  return rows;
}

nlohmann::json parity(const SwitchConfig& c, std::shared_ptr<TensorSource> src,
                      CudaSwitchModel& gpu, const std::vector<std::vector<int32_t>>& mix, int n) {
  // One padded batch of n real samples spread over the mix.
  std::vector<std::vector<int32_t>> picked;
  for (int i = 0; i < n; ++i)
    picked.push_back(mix[static_cast<size_t>(i) * mix.size() / static_cast<size_t>(n)]);
  const Batch batch = pad_batch(picked, 0, picked.size());
  const double t0 = bench::now_s();
  LoadOptions lo{true};
  lo.f32_expert_budget_bytes = size_t{64} << 30;
  auto cpu = SwitchModel::from_source(c, src, lo);
  auto filter = [](std::string_view k) {
    return k.find("router_logits") != std::string_view::npos ||
           k.find("expert") != std::string_view::npos;
  };
  RecordingObserver want(filter), got(filter);
  cpu->encode(batch, &want);
  const double cpu_s = bench::now_s() - t0;
  gpu.encode(batch, &got);
  nlohmann::json layers = nlohmann::json::array();
  int64_t agree = 0, total = 0;
  std::vector<double> margins;  // CPU top-2 logit margin where the top-1 differs
  std::vector<double> all_margins;
  for (int blk : c.sparse_encoder_blocks()) {
    const std::string k = keys::layer(keys::Stack::kEncoder, blk) + ".";
    const Tensor& wl = want.last(k + "router_logits");
    const Tensor& gl = got.last(k + "router_logits");
    const auto* we = want.last(k + "expert").data<int32_t>();
    const auto* ge = got.last(k + "expert").data<int32_t>();
    const int64_t E = c.num_experts;
    double num = 0, den = 0;
    int64_t la = 0, lt = 0;
    for (int64_t t = 0; t < batch.B * batch.S; ++t) {
      if (!batch.attention_mask[static_cast<size_t>(t)]) continue;  // real tokens only
      const float* w = wl.data<float>() + t * E;
      const float* g = gl.data<float>() + t * E;
      for (int64_t e = 0; e < E; ++e) {
        num += (static_cast<double>(g[e]) - w[e]) * (static_cast<double>(g[e]) - w[e]);
        den += static_cast<double>(w[e]) * w[e];
      }
      std::vector<float> sorted(w, w + E);
      std::partial_sort(sorted.begin(), sorted.begin() + 2, sorted.end(), std::greater<float>());
      const double margin = sorted[0] - sorted[1];
      all_margins.push_back(margin);
      ++lt;
      if (we[t] == ge[t])
        ++la;
      else
        margins.push_back(margin);
    }
    agree += la;
    total += lt;
    layers.push_back({{"block", blk},
                      {"logits_rel_err", std::sqrt(num / den)},
                      {"top1_agreement", static_cast<double>(la) / static_cast<double>(lt)}});
  }
  std::sort(margins.begin(), margins.end());
  std::sort(all_margins.begin(), all_margins.end());
  auto q = [](const std::vector<double>& v, double p) {
    return v.empty() ? 0.0 : v[static_cast<size_t>(p * (v.size() - 1))];
  };
  std::printf(
      "\nparity bf16 GPU vs fp32 CPU: %d samples, %lld real tokens x %zu layers (CPU %.1f s)\n", n,
      static_cast<long long>(total / static_cast<int64_t>(layers.size())), layers.size(), cpu_s);
  for (const auto& l : layers)
    std::printf("  block %2d  logits rel err %.2e  top-1 agreement %.4f\n", l["block"].get<int>(),
                l["logits_rel_err"].get<double>(), l["top1_agreement"].get<double>());
  std::printf(
      "  overall top-1 agreement %.5f; %zu disagreements; their CPU top-2 margin: max %.4f, median "
      "%.4f "
      "(all tokens: median %.4f, 1%% quantile %.4f)\n",
      static_cast<double>(agree) / static_cast<double>(total), margins.size(),
      margins.empty() ? 0.0 : margins.back(), q(margins, 0.5), q(all_margins, 0.5),
      q(all_margins, 0.01));
  return {
      {"samples", n},
      {"real_tokens_per_layer", total / static_cast<int64_t>(layers.size())},
      {"layers", layers},
      {"top1_agreement", static_cast<double>(agree) / static_cast<double>(total)},
      {"disagreement_margins", margins},
      {"margin_quantiles_all",
       {{"q01", q(all_margins, 0.01)}, {"q10", q(all_margins, 0.1)}, {"q50", q(all_margins, 0.5)}}},
      {"cpu_seconds", cpu_s}};
}

int main_impl(int argc, char** argv) {
  const Args a = parse(argc, argv);
  if (!cuda::device_available()) {
    std::printf("bench_gpu: no CUDA device\n");
    return 0;
  }
  nlohmann::json j;
  j["date"] = bench::today_utc();
  j["gpu"] = std::string(cuda::device_name());
  j["cpu"] = bench::cpu_model();
  j["precision"] = precision_mode(a.precision_name).beyond_operands()
                       ? a.precision_name
                       : std::string(dtype_name(a.precision));
  const std::string model = a.model.empty() ? "switch-base-" + std::to_string(a.experts) : a.model;
  const std::optional<SwitchConfig> published = published_config(model);
  if (!published)
    fail("bench_gpu: --model '", model, "': expected switch-base-<N> or switch-large-<N>");
  const SwitchConfig c = *published;
  j["model"] = model;
  j["experts"] = c.num_experts;
  std::printf("bench_gpu: %s shape, %s, %s\n", model.c_str(), a.precision_name.c_str(),
              std::string(cuda::device_name()).c_str());

  const double peak = a.ncu ? 0.0 : measure_peak_tflops();
  j["peak_bf16_tflops_measured"] = peak;
  double t0 = bench::now_s();
  // Random weights at transformers' init scales (model/cuda/hf_init_weights.h), as the HF baseline.
  // The decoder only for --generate.
  const bool encoder_only = a.generate == 0;
  auto src = make_hf_init_random_weights(
      c, RandomWeightOptions{42, a.precision == DType::kF32 ? DType::kF32 : DType::kBF16,
                             encoder_only});
  const double gen_s = bench::now_s() - t0;
  const size_t used0 = gpu_used_bytes();
  auto m = CudaSwitchModel::from_source(c, src, LoadOptions{encoder_only},
                                        cuda_options_for_precision(a.precision_name));
  std::printf(
      "random weights %.1f s, upload %.1f s, weights+buffers %.2f GiB; matrix ceiling %.0f "
      "TFLOP/s\n",
      gen_s, m->load_seconds(), static_cast<double>(m->device_bytes()) / (1 << 30), peak);
  j["load_seconds"] = m->load_seconds();
  const KeyRequest spec = pipeline_request(c, false);

  std::vector<std::vector<int32_t>> mix;
  if (a.shapes.find("mix") != std::string::npos || a.parity > 0) mix = read_mix(a.mix);
  if (a.batch_tokens < 1024 || a.mix_windows < 1)
    fail("--batch-tokens >= 1024 and --mix-windows >= 1 expected");

  std::printf("\n%-24s %8s %8s %12s %12s %9s %8s %10s\n", "shape", "batches", "padding", "tokens/s",
              "real tok/s", "TFLOP/s", "roofline", "GPU GiB");
  nlohmann::json rows = nlohmann::json::array();
  std::stringstream shapes(a.ncu ? std::string("128x256") : a.shapes);
  std::string shape;
  while (std::getline(shapes, shape, ',')) {
    std::vector<Batch> batches;
    if (shape == "mix") {
      batches = mix_batches(mix, 128);
    } else if (shape.rfind("mix-collect", 0) == 0) {  // mix-collect[-greedy][@W]
      const size_t at = shape.find('@');
      const int64_t per_window = at == std::string::npos ? 1024 : std::stoll(shape.substr(at + 1));
      if (per_window < 1) fail("shape ", shape, ": expected mix-collect[-greedy][@W], W >= 1");
      const int64_t windows = std::max<int64_t>(1, a.mix_windows * 1024 / per_window);
      batches = collect_batches(mix, windows, per_window, {a.batch_tokens, a.batch_overhead},
                                shape.find("-greedy") != std::string::npos);
    } else {
      const auto x = shape.find('x');
      const int64_t B = std::stoll(shape.substr(0, x)), S = std::stoll(shape.substr(x + 1));
      for (int i = 0; i < 16; ++i)
        batches.push_back(random_batch(B, S, c.vocab_size, 7 + static_cast<uint64_t>(i)));
    }
    int64_t tokens = 0, real = 0;
    double flops = 0;
    for (const Batch& b : batches) {
      tokens += b.B * b.S;
      const int64_t r =
          std::accumulate(b.attention_mask.begin(), b.attention_mask.end(), int64_t{0});
      real += r;
      flops += flops_per_token(c, static_cast<double>(b.S)) * static_cast<double>(b.B * b.S);
    }
    run_pipeline(*m, batches, spec);  // warm-up: buffers, cuBLASLt plans, bias tables
    if (a.ncu) {                      // one batch under `ncu --profile-from-start off`
      MT_CUDA_CHECK(cudaProfilerStart());
      run_pipeline(*m, {batches.front()}, spec);
      MT_CUDA_CHECK(cudaProfilerStop());
      break;
    }
    const double first =
        run_pipeline(*m, batches, spec);  // one cold-ish pass (the seed job's size for "mix")
    int reps = 1;
    double secs = first;
    while (secs < a.budget) {
      secs += run_pipeline(*m, batches, spec);
      ++reps;
    }
    const double per = secs / reps;
    const double tps = static_cast<double>(tokens) / per, rtps = static_cast<double>(real) / per;
    const double tflops = flops / per / 1e12;
    const double mem = static_cast<double>(gpu_used_bytes() - used0) / (1 << 30);
    const double padding = 1.0 - static_cast<double>(real) / static_cast<double>(tokens);
    std::printf("%-24s %8zu %7.1f%% %12.0f %12.0f %9.1f %7.1f%% %10.2f\n", shape.c_str(),
                batches.size(), 100.0 * padding, tps, rtps, tflops,
                peak > 0 ? 100.0 * tflops / peak : 0.0, mem);
    rows.push_back({{"shape", shape},
                    {"batches", batches.size()},
                    {"tokens", tokens},
                    {"real_tokens", real},
                    {"padding_fraction", padding},
                    {"seconds_per_pass", per},
                    {"first_pass_seconds", first},
                    {"tokens_per_s", tps},
                    {"real_tokens_per_s", rtps},
                    {"tflops", tflops},
                    {"roofline_fraction", peak > 0 ? tflops / peak : 0.0},
                    {"gpu_gib_since_load_start", mem}});
    if (shape == "mix")
      std::printf(
          "  seed job: %zu real samples (%lld real tokens) collected end to end in %.3f s (first "
          "pass)\n",
          mix.size(), static_cast<long long>(real), first);
  }
  j["rows"] = rows;
  j["device_bytes_model"] = m->device_bytes();
  if (!a.store.empty() && !a.ncu) {
    const std::vector<Batch> batches = mix_batches(mix, 128);
    const double secs = run_into_store(*m, c, model, batches, a.store);
    const auto problems = verify_store(a.store);
    std::printf(
        "  seed job into a trace store (%s): %zu samples, %zu traces, %.3f s end to end after "
        "model "
        "load; verify: %s\n",
        a.store.c_str(), mix.size(), mix.size() * c.sparse_encoder_blocks().size(), secs,
        problems.empty() ? "OK" : problems.front().c_str());
    j["store_seconds"] = secs;
    j["store_verify_ok"] = problems.empty();
  }
  if (a.generate > 0 && !a.ncu) j["generate"] = generation(*m, c, a);
  if (a.parity > 0 && !a.ncu) j["parity"] = parity(c, src, *m, mix, a.parity);
  if (!a.json.empty()) {
    std::ofstream(a.json) << j.dump(1) << "\n";
    std::printf("wrote %s\n", a.json.c_str());
  }
  return 0;
}

}  // namespace
}  // namespace moetrace

int main(int argc, char** argv) {
  try {
    return moetrace::main_impl(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_gpu: %s\n", e.what());
    return 1;
  }
}
