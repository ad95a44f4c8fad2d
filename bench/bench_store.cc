// Trace store write throughput: TraceWriter::add() of GPU-shaped samples (F16 logits handed over
// raw, as the GPU pipeline does) into a real store, then finish(). Prints a table and writes JSON
// (date, machine). Where a collection's time goes when the engine is fast.
//
//   bench_store [--dir DIR] [--samples N] [--tokens S] [--experts E] [--layers L] [--json FILE]
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <vector>

#include "bench/bench_util.h"
#include "core/dtype.h"
#include "trace/store.h"

using namespace moetrace;

int main(int argc, char** argv) {
  std::string dir = "/tmp/moetrace-bench-store", json_path;
  int64_t samples = 4096, S = 256, E = 128, L = 6;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string k = argv[i], v = argv[i + 1];
    if (k == "--dir")
      dir = v;
    else if (k == "--samples")
      samples = std::stoll(v);
    else if (k == "--tokens")
      S = std::stoll(v);
    else if (k == "--experts")
      E = std::stoll(v);
    else if (k == "--layers")
      L = std::stoll(v);
    else if (k == "--json")
      json_path = v;
    else {
      std::fprintf(stderr, "bench_store: unknown option %s\n", k.c_str());
      return 2;
    }
  }
  StoreSettings ss;
  ss.settings = {{"benchmark", "bench_store"}};
  ss.model = {{"id", "synthetic"}};
  for (int64_t l = 0; l < L; ++l) ss.enc_layers.push_back(static_cast<int>(2 * l + 1));
  ss.num_experts = E;
  ss.d_model = 768;
  ss.logits_dtype = DType::kF16;
  ss.device = "none";

  // One sample's layer tensors, reused (the writer copies them).
  std::mt19937 rng(1);
  std::normal_distribution<float> normal;
  std::vector<uint16_t> logits(static_cast<size_t>(S * E));
  for (auto& x : logits) x = f32_to_f16(normal(rng));
  std::vector<int32_t> expert(static_cast<size_t>(S));
  for (auto& x : expert) x = static_cast<int32_t>(rng() % static_cast<uint32_t>(E));
  std::vector<uint8_t> dropped(static_cast<size_t>(S), 0);
  std::vector<float> gate(static_cast<size_t>(S), 0.5f);
  std::vector<int32_t> ids(static_cast<size_t>(S), 7);

  const double t0 = bench::now_s();
  double add_s = 0;
  {
    auto writer = TraceWriter::open(dir, ss, OpenMode::kOverwrite);
    // Windows of 1024 samples handed over at once, as `moetrace collect` does.
    std::vector<SampleRecord> window;
    auto flush = [&] {
      const double a = bench::now_s();
      writer->add(window);
      add_s += bench::now_s() - a;
      window.clear();
    };
    for (int64_t i = 0; i < samples; ++i) {
      SampleRecord& r = window.emplace_back();
      r.sample_id = "bench/" + std::to_string(i);
      r.dataset = "bench";
      r.row = i;
      r.token_ids = ids;
      for (int64_t l = 0; l < L; ++l) {
        LayerRecord lr;
        lr.router_logits_raw = logits.data();
        lr.router_logits_raw_dtype = DType::kF16;
        lr.expert = expert.data();
        lr.dropped = dropped.data();
        lr.gate = gate.data();
        r.enc.push_back(lr);
      }
      if (window.size() == 1024) flush();
    }
    if (!window.empty()) flush();
    writer->finish(bench::now_s() - t0);
  }
  const double total = bench::now_s() - t0;
  const double bytes = static_cast<double>(samples * S * L * E * 2);
  const double tokens = static_cast<double>(samples * S);
  std::printf(
      "bench_store: %lld samples x %lld tokens, %lld layers x %lld experts, F16 logits, %s\n",
      static_cast<long long>(samples), static_cast<long long>(S), static_cast<long long>(L),
      static_cast<long long>(E), dir.c_str());
  std::printf("%-28s %10s %12s %10s\n", "", "seconds", "M tokens/s", "GB/s");
  std::printf("%-28s %10.3f %12.3f %10.2f\n", "add() calls (main thread)", add_s,
              tokens / add_s / 1e6, bytes / add_s / 1e9);
  std::printf("%-28s %10.3f %12.3f %10.2f\n", "end to end (incl. finish)", total,
              tokens / total / 1e6, bytes / total / 1e9);
  if (!json_path.empty()) {
    const nlohmann::json j = {{"date", bench::today_utc()},
                              {"machine", bench::hostname()},
                              {"cpu", bench::cpu_model()},
                              {"benchmark", "bench_store"},
                              {"samples", samples},
                              {"tokens_per_sample", S},
                              {"layers", L},
                              {"experts", E},
                              {"add_seconds", add_s},
                              {"total_seconds", total},
                              {"tokens_per_second", tokens / total},
                              {"logit_bytes_per_second", bytes / total}};
    std::ofstream(json_path) << j.dump(2) << "\n";
  }
  std::filesystem::remove_all(dir);
  return 0;
}
