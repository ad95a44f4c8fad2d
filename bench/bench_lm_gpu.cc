// GPU benchmark of the MoE language models (docs/PERFORMANCE.md, "Language models"): prefill
// tokens/s of CudaLmModel with random weights made on the device (cuda::fill_uniform, never through
// the host) at the published shapes of OLMoE-1B-7B (64 experts top-8) and Mixtral-8x7B (8 experts
// top-2, ~93 GB in bf16), per batch shape, bare and with the routing captured (lm.{i}.router_logits,
// expert and gate of every MoE layer copied to the host). A model larger than the GPU is reported
// with the error the engine gives and then measured with as many of its layers as fit
// (`layers` says how many; `full_model_estimate` scales the tokens/s by layers / num_layers).
// Prints a table; --json writes it with the date and the GPU.
//
//   bench_lm_gpu [--models olmoe-1b-7b,mixtral-8x7b] [--shapes 1x512,32x512] [--precision bf16]
//                [--budget SECONDS] [--json FILE]
#include <algorithm>
#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "bench_util.h"
#include "core/error.h"
#include "kernels/cuda/common.h"
#include "model/cuda/cuda_lm_model.h"

namespace moetrace {
namespace {

struct Args {
  std::string models = "olmoe-1b-7b,mixtral-8x7b";
  std::string shapes = "1x512,32x512";
  std::string precision = "bf16";
  double budget = 3.0;  // seconds of timed batches per row (at least 3 batches)
  std::string json;
};

std::vector<std::string> split(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream in(s);
  std::string part;
  while (std::getline(in, part, ','))
    if (!part.empty()) out.push_back(part);
  return out;
}

Args parse(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    const std::string k = argv[i];
    auto val = [&]() -> std::string {
      if (i + 1 >= argc) fail(k, ": a value is expected");
      return argv[++i];
    };
    if (k == "--models") {
      a.models = val();
    } else if (k == "--shapes") {
      a.shapes = val();
    } else if (k == "--precision") {
      a.precision = val();
    } else if (k == "--budget") {
      a.budget = std::stod(val());
    } else if (k == "--json") {
      a.json = val();
    } else {
      fail("bench_lm_gpu: unknown option '", k,
           "' (expected --models, --shapes, --precision, --budget, --json)");
    }
  }
  return a;
}

// The published configs (config.json of allenai/OLMoE-1B-7B-0924 and
// mistralai/Mixtral-8x7B-v0.1).
LmConfig published(const std::string& name) {
  LmConfig c;
  c.max_position_embeddings = 4096;
  c.rms_norm_eps = 1e-5;
  if (name == "olmoe-1b-7b") {
    c.family = LmFamily::kOlmoe;
    c.vocab_size = 50304;
    c.hidden_size = 2048;
    c.intermediate_size = 1024;
    c.moe_intermediate_size = 1024;
    c.num_hidden_layers = 16;
    c.num_attention_heads = 16;
    c.num_key_value_heads = 16;
    c.head_dim = 128;
    c.rope_theta = 10000.0;
    c.num_experts = 64;
    c.top_k = 8;
    c.norm_topk_prob = false;
    c.qk_norm = QkNorm::kFull;
    c.eos_token_ids = {50279};
    return c;
  }
  if (name == "mixtral-8x7b") {
    c.family = LmFamily::kMixtral;
    c.vocab_size = 32000;
    c.hidden_size = 4096;
    c.intermediate_size = 14336;
    c.moe_intermediate_size = 14336;
    c.num_hidden_layers = 32;
    c.num_attention_heads = 32;
    c.num_key_value_heads = 8;
    c.head_dim = 128;
    c.rope_theta = 1e6;
    c.num_experts = 8;
    c.top_k = 2;
    c.norm_topk_prob = true;
    c.eos_token_ids = {2};
    return c;
  }
  fail("bench_lm_gpu: unknown model '", name, "' (expected olmoe-1b-7b or mixtral-8x7b)");
}

// Keeps the routing of every MoE layer (what a trace stores), dropping the bytes once offered.
class RoutingSink : public Observer {
 public:
  bool wants(std::string_view k) const override {
    return k.rfind("lm.", 0) == 0 &&
           (k.ends_with(".router_logits") || k.ends_with(".expert") || k.ends_with(".gate"));
  }
  void observe(std::string_view, const TensorView& t) override { bytes += t.nbytes(); }
  size_t bytes = 0;
};

Batch random_ids(int64_t B, int64_t S, int64_t V, uint64_t seed) {
  std::mt19937_64 rng(seed);
  Batch b;
  b.B = B;
  b.S = S;
  for (int64_t i = 0; i < B * S; ++i) {
    b.input_ids.push_back(static_cast<int32_t>(rng() % static_cast<uint64_t>(V)));
    b.attention_mask.push_back(1);
  }
  return b;
}

// Builds the model, or, when it does not fit, as many of its layers as do.
std::unique_ptr<CudaLmModel> build(LmConfig c, DType prec, nlohmann::json& row) {
  try {
    return CudaLmModel::random(c, CudaOptions{prec}, 20);
  } catch (const Error& e) {
    row["full_model_error"] = e.what();
    std::printf("  %s\n", e.what());
  }
  size_t free_b = 0, total_b = 0;
  MT_CUDA_CHECK(cudaMemGetInfo(&free_b, &total_b));
  const int64_t L = c.num_hidden_layers;
  for (int64_t l = L - 1; l >= 1; --l) {
    c.num_hidden_layers = l;
    try {
      auto m = CudaLmModel::random(c, CudaOptions{prec}, 20);
      // Leave room for the activations of the largest shape (about 8 GiB at 32x512).
      if (m->device_bytes() + (size_t{8} << 30) > free_b) continue;
      return m;
    } catch (const Error&) {
    }
  }
  fail("bench_lm_gpu: not even one layer fits");
}

}  // namespace
}  // namespace moetrace

int main(int argc, char** argv) {
  using namespace moetrace;
  try {
    const Args a = parse(argc, argv);
    const PrecisionMode pm = precision_mode(a.precision, "--precision");
    if (!cuda::device_available()) fail("no CUDA device available");
    nlohmann::json j;
    j["date"] = bench::today_utc();
    j["gpu"] = std::string(cuda::device_name());
    j["host"] = bench::hostname();
    j["precision"] = a.precision;
    j["note"] =
        "prefill only (no LM head): embedding, every layer with its router, causal attention; "
        "random weights made on the device; full-length rows (every token counted is real)";
    std::printf("bench_lm_gpu on %s, %s, %s\n", std::string(cuda::device_name()).c_str(),
                a.precision.c_str(), bench::today_utc().c_str());
    std::printf("%-14s %-8s %-7s %-9s %12s %12s %10s %9s\n", "model", "shape", "layers", "capture",
                "tokens/s", "ms/batch", "GPU GiB", "load s");
    nlohmann::json rows = nlohmann::json::array();
    for (const std::string& name : split(a.models)) {
      const LmConfig c = published(name);
      nlohmann::json base;
      base["model"] = name;
      base["config"] = c.summary();
      std::unique_ptr<CudaLmModel> m = build(c, pm.operands, base);
      const int64_t layers = m->config().num_hidden_layers;
      for (const std::string& shape : split(a.shapes)) {
        const size_t x = shape.find('x');
        if (x == std::string::npos) fail("--shapes: '", shape, "' is not BxS");
        const int64_t B = std::stoll(shape.substr(0, x)), S = std::stoll(shape.substr(x + 1));
        const Batch batch = random_ids(B, S, c.vocab_size, 7);
        for (bool capture : {false, true}) {
          RoutingSink sink;
          Observer* obs = capture ? &sink : nullptr;
          m->prefill(batch, obs);  // warm-up: buffers, cuBLASLt plans
          int iters = 0;
          const double t0 = bench::now_s();
          double t = t0;
          while (iters < 3 || t - t0 < a.budget) {
            m->prefill(batch, obs);  // waits for the device
            ++iters;
            t = bench::now_s();
          }
          const double sec = (t - t0) / iters;
          const double tps = static_cast<double>(B * S) / sec;
          const double gib = static_cast<double>(m->device_bytes()) / (1024.0 * 1024 * 1024);
          nlohmann::json row = base;
          row["shape"] = shape;
          row["B"] = B;
          row["S"] = S;
          row["layers"] = layers;
          row["num_layers"] = c.num_hidden_layers;
          row["capture"] = capture ? "routing" : "none";
          row["tokens_per_s"] = tps;
          row["ms_per_batch"] = sec * 1e3;
          row["iterations"] = iters;
          row["device_gib"] = gib;
          row["load_s"] = m->load_seconds();
          if (capture)
            row["captured_bytes_per_batch"] = sink.bytes / static_cast<size_t>(iters + 1);
          if (layers != c.num_hidden_layers)
            row["full_model_estimate_tokens_per_s"] =
                tps * static_cast<double>(layers) / static_cast<double>(c.num_hidden_layers);
          rows.push_back(row);
          std::printf("%-14s %-8s %3lld/%-3lld %-9s %12.0f %12.2f %10.1f %9.1f\n", name.c_str(),
                      shape.c_str(), static_cast<long long>(layers),
                      static_cast<long long>(c.num_hidden_layers), capture ? "routing" : "none",
                      tps, sec * 1e3, gib, m->load_seconds());
        }
      }
    }
    j["rows"] = rows;
    if (!a.json.empty()) {
      std::ofstream(a.json) << j.dump(1) << "\n";
      std::printf("wrote %s\n", a.json.c_str());
    }
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_lm_gpu: %s\n", e.what());
    return 1;
  }
}
