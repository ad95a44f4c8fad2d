// CPU engine benchmark: random-weight models of the switch-base-8 and switch-base-128 shapes built
// in memory (no download); encoder tokens/s at batch×length 1×128 and 8×256, peak RSS, this
// machine's sgemm GFLOP/s and the FFN GEMM shapes' fraction of it. Prints a table, writes JSON.
//   bench_cpu [--models 8,128] [--threads N] [--reps R] [--json FILE]
#include <cstdio>
#include <cstring>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <vector>

#include "bench_util.h"
#include "kernels/cpu/ops.h"
#include "model/random_weights.h"
#include "model/switch_model.h"

using namespace moetrace;
using nlohmann::json;

namespace {

// GFLOP/s of C[M,N] = A[M,K]·B[N,K]ᵀ, best of a few runs.
double sgemm_gflops(int64_t M, int64_t N, int64_t K, int reps) {
  std::vector<float> A(static_cast<size_t>(M * K), 0.5f), B(static_cast<size_t>(N * K), 0.25f),
      C(static_cast<size_t>(M * N));
  cpu::gemm_nt(M, N, K, 1.0f, A.data(), K, B.data(), K, 0.0f, C.data(), N);  // warm-up
  double best = 1e30;
  for (int r = 0; r < reps; ++r) {
    const double t0 = bench::now_s();
    cpu::gemm_nt(M, N, K, 1.0f, A.data(), K, B.data(), K, 0.0f, C.data(), N);
    best = std::min(best, bench::now_s() - t0);
  }
  return 2.0 * M * N * K / best / 1e9;
}

Batch random_batch(int64_t B, int64_t S, uint64_t seed) {
  Batch b;
  b.B = B;
  b.S = S;
  std::mt19937_64 rng(seed);
  for (int64_t i = 0; i < B * S; ++i) {
    b.input_ids.push_back(static_cast<int32_t>(3 + rng() % 32000));
    b.attention_mask.push_back(1);
  }
  return b;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<int64_t> models = {8, 128};
  int threads = 0, reps = 3;
  std::string json_path = "bench_cpu.json";
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--models" && i + 1 < argc) {
      models.clear();
      for (char* tok = std::strtok(argv[++i], ","); tok; tok = std::strtok(nullptr, ","))
        models.push_back(std::atoll(tok));
    } else if (a == "--threads" && i + 1 < argc) {
      threads = std::atoi(argv[++i]);
    } else if (a == "--reps" && i + 1 < argc) {
      reps = std::atoi(argv[++i]);
    } else if (a == "--json" && i + 1 < argc) {
      json_path = argv[++i];
    } else {
      std::fprintf(stderr,
                   "usage: bench_cpu [--models 8,128] [--threads N] [--reps R] [--json FILE]\n");
      return 2;
    }
  }
  cpu::set_num_threads(threads);
  json out = {{"date", bench::today_utc()},
              {"host", bench::hostname()},
              {"cpu", bench::cpu_model()},
              {"threads", cpu::num_threads()}};

  const double peak = sgemm_gflops(2048, 3072, 768, reps);
  const double dense_ffn = sgemm_gflops(2048, 3072, 768, reps);     // dense FFN wi at 8×256
  const double dense_ffn_wo = sgemm_gflops(2048, 768, 3072, reps);  // dense FFN wo
  const double expert8 = sgemm_gflops(256, 3072, 768, reps);        // one of 8 experts at 8×256
  const double expert128 = sgemm_gflops(16, 3072, 768, reps);       // one of 128 experts at 8×256
  const double big = sgemm_gflops(4096, 4096, 4096, 1);
  const double sgemm_peak = std::max(peak, big);
  std::printf("moetrace CPU benchmark  %s  %s  threads=%d\n", bench::today_utc().c_str(),
              bench::cpu_model().c_str(), cpu::num_threads());
  std::printf("sgemm peak (max of 4096³ and 2048×3072×768): %.1f GFLOP/s\n", sgemm_peak);
  std::printf("%-34s %10s %8s\n", "GEMM shape [M,N,K]", "GFLOP/s", "of peak");
  const std::pair<const char*, double> shapes[] = {{"dense FFN wi [2048,3072,768]", dense_ffn},
                                                   {"dense FFN wo [2048,768,3072]", dense_ffn_wo},
                                                   {"expert (E=8)  wi [256,3072,768]", expert8},
                                                   {"expert (E=128) wi [16,3072,768]", expert128}};
  json gemms = json::array();
  for (auto [name, g] : shapes) {
    std::printf("%-34s %10.1f %7.0f%%\n", name, g, 100.0 * g / sgemm_peak);
    gemms.push_back({{"shape", name}, {"gflops", g}, {"fraction_of_peak", g / sgemm_peak}});
  }
  out["sgemm_peak_gflops"] = sgemm_peak;
  out["gemm_shapes"] = gemms;

  json rows = json::array();
  std::printf("\n%-16s %-6s %-10s %12s %10s %12s\n", "model", "dtype", "batch×len", "tokens/s",
              "ms/batch", "peak RSS GiB");
  for (int64_t E : models) {
    const SwitchConfig cfg = switch_base_config(E);
    RandomWeightOptions ro;
    ro.seed = 1;
    ro.encoder_only = true;
    ro.dtype =
        E > 32 ? DType::kBF16 : DType::kF32;  // base-128's encoder is 14.8 GB in f32: keep bf16
    LoadOptions lo;
    lo.encoder_only = true;
    const double t_load = bench::now_s();
    auto model = SwitchModel::from_source(cfg, make_random_weights(cfg, ro), lo);
    const double load_s = bench::now_s() - t_load;
    for (auto [B, S] : {std::pair<int64_t, int64_t>{1, 128}, {8, 256}}) {
      const Batch batch = random_batch(B, S, 7);
      model->encode(batch, nullptr);  // warm-up
      double best = 1e30;
      for (int r = 0; r < reps; ++r) {
        const double t0 = bench::now_s();
        model->encode(batch, nullptr);
        best = std::min(best, bench::now_s() - t0);
      }
      const double tps = static_cast<double>(B * S) / best;
      std::printf("%-16s %-6s %4lld×%-5lld %12.0f %10.1f %12.2f\n",
                  ("switch-base-" + std::to_string(E)).c_str(),
                  std::string(dtype_name(ro.dtype)).c_str(), static_cast<long long>(B),
                  static_cast<long long>(S), tps, best * 1e3, bench::peak_rss_gib());
      rows.push_back({{"model", "switch-base-" + std::to_string(E)},
                      {"weights_dtype", dtype_name(ro.dtype)},
                      {"batch", B},
                      {"length", S},
                      {"tokens_per_s", tps},
                      {"ms_per_batch", best * 1e3},
                      {"peak_rss_gib", bench::peak_rss_gib()},
                      {"load_s", load_s}});
    }
  }
  out["encoder"] = rows;
  std::ofstream(json_path) << out.dump(2) << "\n";
  std::printf("\nwrote %s\n", json_path.c_str());
  return 0;
}
