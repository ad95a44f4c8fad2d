// Collection overhead on the CPU: `moetrace collect`'s loop (tokenizer thread, length-bucketed
// batches, observation copies, the trace store's writer thread) against the bare forward over the
// same samples in the same batching, no observer. Prints a table, writes JSON.
//   bench_collect [--model demo|DIR] [--traces N] [--datasets demo] [--data-root DIR] [--threads N]
//                 [--batch-tokens N] [--json FILE]
#include <cstdio>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "bench_util.h"
#include "collect/collect.h"
#include "collect/model_source.h"
#include "data/plan.h"
#include "kernels/cpu/ops.h"
#include "model/engine_io.h"
#include "model/switch_model.h"
#include "text/tokenizer.h"

using namespace moetrace;

int main(int argc, char** argv) {
  CollectOptions o;
  o.model = "demo";
  o.traces = 3000;
  o.datasets = "demo";
  o.progress = false;
  o.overwrite = true;
  std::string json_path = "bench_collect.json";
  o.batch_tokens = 8192;  // the CPU default of `moetrace collect`
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string k = argv[i], v = argv[i + 1];
    if (k == "--model")
      o.model = v;
    else if (k == "--traces")
      o.traces = std::stoll(v);
    else if (k == "--datasets")
      o.datasets = v;
    else if (k == "--data-root")
      o.data_roots.push_back(v);
    else if (k == "--threads")
      o.threads = std::stoi(v);
    else if (k == "--batch-tokens")
      o.batch_tokens = std::stoll(v);
    else if (k == "--json")
      json_path = v;
    else {
      std::fprintf(stderr, "bench_collect: unknown option %s\n", k.c_str());
      return 2;
    }
  }
  try {
    cpu::set_num_threads(o.threads);
    ModelChoice mc = choose_model(o.model, true);
    const T5Tokenizer tok = T5Tokenizer::load(mc.spiece);
    const int64_t L = static_cast<int64_t>(mc.config.sparse_encoder_blocks().size());
    PlanOptions po;
    po.datasets = o.datasets;
    po.data_roots = o.data_roots;
    if (mc.demo && po.data_roots.empty()) po.data_roots.push_back(data::demo_data_root());
    po.max_samples = (o.traces + L - 1) / L;
    PlanStats stats;
    const auto plan = build_plan(po, &stats);
    std::vector<std::vector<int32_t>> ids;
    std::vector<int64_t> lengths;
    int64_t real_tokens = 0;
    for (const auto& p : plan) {
      ids.push_back(tok.encode(p.text, o.max_length));
      lengths.push_back(static_cast<int64_t>(ids.back().size()));
      real_tokens += lengths.back();
    }
    LoadOptions lo;
    lo.encoder_only = true;
    auto model = SwitchModel::from_source(mc.config, mc.weights, lo);
    const auto groups = length_batches(lengths, {o.batch_tokens, kBatchOverheadTokensCpu});
    std::vector<Batch> batches;
    for (const auto& g : groups) {
      Batch b;
      b.B = static_cast<int64_t>(g.size());
      b.S = lengths[g.front()];
      b.input_ids.assign(static_cast<size_t>(b.B * b.S), 0);
      b.attention_mask.assign(static_cast<size_t>(b.B * b.S), 0);
      for (int64_t r = 0; r < b.B; ++r) {
        const auto& x = ids[g[static_cast<size_t>(r)]];
        std::copy(x.begin(), x.end(), b.input_ids.begin() + r * b.S);
        std::fill_n(b.attention_mask.begin() + r * b.S, x.size(), 1);
      }
      batches.push_back(std::move(b));
    }
    model->encode(batches.front(), nullptr);  // warm-up
    double t0 = bench::now_s();
    for (const Batch& b : batches) model->encode(b, nullptr);
    const double bare = bench::now_s() - t0;

    const std::filesystem::path dir =
        std::filesystem::temp_directory_path() / "moetrace_bench_collect";
    o.output = dir.string();
    const CollectResult r = run_collect(o);
    std::filesystem::remove_all(dir);

    const double overhead = r.loop_seconds / bare - 1.0;
    std::printf("moetrace collect overhead  %s  %s  threads=%d  model=%s\n",
                bench::today_utc().c_str(), bench::cpu_model().c_str(), cpu::num_threads(),
                mc.id.c_str());
    std::printf("%zu samples, %lld real tokens, %zu batches (budget %lld tokens)\n", plan.size(),
                static_cast<long long>(real_tokens), batches.size(),
                static_cast<long long>(o.batch_tokens));
    std::printf("%-40s %10s %12s\n", "", "seconds", "tokens/s");
    std::printf("%-40s %10.2f %12.0f\n", "bare forward (no observer)", bare, real_tokens / bare);
    std::printf("%-40s %10.2f %12.0f\n", "collect loop (capture + store)", r.loop_seconds,
                real_tokens / r.loop_seconds);
    std::printf("%-40s %10.2f\n", "  of which in the engine (+ capture)", r.engine_seconds);
    std::printf("overhead of collect over the bare forward: %+.1f%%\n", 100 * overhead);
    nlohmann::json j = {{"date", bench::today_utc()},
                        {"cpu", bench::cpu_model()},
                        {"host", bench::hostname()},
                        {"threads", cpu::num_threads()},
                        {"model", mc.id},
                        {"samples", plan.size()},
                        {"real_tokens", real_tokens},
                        {"batches", batches.size()},
                        {"bare_seconds", bare},
                        {"collect_loop_seconds", r.loop_seconds},
                        {"engine_seconds", r.engine_seconds},
                        {"overhead", overhead}};
    std::ofstream(json_path) << j.dump(2) << "\n";
    std::printf("wrote %s\n", json_path.c_str());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_collect: %s\n", e.what());
    return 1;
  }
  return 0;
}
