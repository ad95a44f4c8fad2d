// moetrace collect: batched trace collection into a resumable trace store (docs/TRACE_FORMAT.md).
#include <optional>

#include "collect/audit.h"
#include "collect/collect.h"
#include "command.h"
#include "core/error.h"
#include "core/log.h"
#include "data/selection.h"

namespace moetrace::cli {
namespace {

struct CollectArgs {
  CollectOptions o;
  std::string logits = "f16", hidden = "none", audit = "0.01";
  std::vector<std::string> data_roots;
  std::string catalog, tokenizer;
  bool no_progress = false;
  std::optional<int> rank, world_size, local_rank;
};

const RegisterCommand reg([](CLI::App& app) {
  auto a = std::make_shared<CollectArgs>();
  CollectOptions& o = a->o;
  CLI::App* sub =
      app.add_subcommand("collect", "Collect MoE routing traces into a trace store (the main job)");
  auto* g = "The seed's options";
  sub->add_option("--traces,-t", o.traces,
                  "traces to collect; one trace = one (sample, encoder MoE layer)")
      ->capture_default_str()
      ->group(g);
  sub->add_option("--model,-m", o.model,
                  "model directory or Hub id (offline, from the HF cache); default: the largest "
                  "google/switch-base-* "
                  "in the cache, else the built-in demo model ('demo')")
      ->group(g);
  sub->add_option("--output,-o", o.output, "trace store directory")
      ->capture_default_str()
      ->group(g);
  sub->add_option("--mode", o.mode, "real | synthetic | mixed")->capture_default_str()->group(g);
  sub->add_option("--real-ratio", o.real_ratio, "share of real traces in mixed mode")
      ->capture_default_str()
      ->group(g);
  auto* gd = "Data";
  sub->add_option(
         "--datasets", o.datasets,
         "core | maximum | demo | a group | name,name,... (moetrace datasets list) | "
         "path/to/file.{jsonl,csv,tsv,txt,parquet}[:field] | folder; default: every "
         "catalog dataset present locally, else the bundled rows (demo with the demo model)")
      ->group(gd);
  sub->add_option("--split", o.split,
                  "train | validation | test | catalog: the split read from every catalog dataset "
                  "(catalog: each dataset's own, docs/DATASETS.md)")
      ->capture_default_str()
      ->group(gd);
  sub->add_option("--data-root", a->data_roots,
                  "folders holding Hub dataset repos (repeatable); the HF cache is searched too")
      ->group(gd);
  sub->add_option("--catalog", a->catalog,
                  "extra dataset spec file (same schema as assets/catalog/datasets.json)")
      ->group(gd);
  sub->add_option("--seed", o.seed, "seed of the sampling plan and of synthetic traces")
      ->capture_default_str()
      ->group(gd);
  sub->add_option("--tokenizer", a->tokenizer,
                  "spiece.model to use (default: the one beside the checkpoint)")
      ->group(gd);
  sub->add_option("--max-length", o.max_length,
                  "tokens per sample at most (the final </s> is kept)")
      ->capture_default_str()
      ->group(gd);
  auto* ge = "Engine";
  sub->add_option(
         "--device", o.device,
         "auto | cpu | cuda | cuda:N; auto: the GPU when built with CUDA and one is visible "
         "(the launcher's local rank picks which), else the CPU")
      ->capture_default_str()
      ->group(ge);
  sub->add_option("--threads", o.threads, "CPU threads (0 = all cores)")
      ->capture_default_str()
      ->group(ge);
  sub->add_option("--batch-tokens", o.batch_tokens,
                  "batch budget: batch size × padded length (default " +
                      std::to_string(kDefaultBatchTokensCpu) + " on cpu, " +
                      std::to_string(kDefaultBatchTokensCuda) + " on cuda)")
      ->group(ge);
  sub->add_option("--batch-overhead", o.batch_overhead,
                  "what one more batch costs, in tokens, when a window is cut into length "
                  "buckets (0: no padding at all; default " +
                      std::to_string(kBatchOverheadTokensCpu) + " on cpu, " +
                      std::to_string(kBatchOverheadTokensCuda) + " on cuda)")
      ->group(ge);
  sub->add_option("--batch-window", o.batch_window,
                  "samples whose real texts are batched together, by length: a multiple of "
                  "--samples-per-shard (0 or absent: one shard on cpu; on cuda as many shards as "
                  "fit 4096 samples and 2 GiB of captured data; a resumed store keeps its own)")
      ->group(ge);
  sub->add_option("--precision", o.precision,
                  "cuda: bf16 | fp16 | fp32 | mixed | faithful (router logits always fp32; mixed: "
                  "fp16 GEMM operands, routing decided in fp32; faithful: mixed with the attention "
                  "in fp16 pairs; docs/GPU.md); the cpu computes in fp32")
      ->capture_default_str()
      ->group(ge);
  auto* gs = "What to store";
  sub->add_option("--logits", a->logits,
                  "router logits: f32 | f16 | bf16 (every logit in that dtype), or topk:K (the K "
                  "largest per token as f16, their experts and the log-sum-exp; "
                  "docs/TRACE_FORMAT.md)")
      ->capture_default_str()
      ->group(gs);
  sub->add_option("--hidden", a->hidden, "router input hidden states: none | bf16 | f32")
      ->capture_default_str()
      ->group(gs);
  sub->add_flag("--decoder", o.decoder, "also record decoder routing during greedy generation")
      ->group(gs);
  sub->add_option("--max-new-tokens", o.max_new_tokens, "generation steps with --decoder")
      ->capture_default_str()
      ->group(gs);
  sub->add_option("--samples-per-shard", o.samples_per_shard, "samples per shard file")
      ->capture_default_str()
      ->group(gs);
  sub->add_option("--audit", a->audit,
                  "re-run this share of the samples (at least one batch) at fp32 once the store "
                  "is complete and record the top-1 agreement and max |logit error| per MoE "
                  "layer in the manifest's fidelity object; 0 = off (docs/TRACE_FORMAT.md)")
      ->capture_default_str()
      ->group(gs);
  auto* gp = "Data-parallel (docs/SCALING.md; detected from mpirun, srun or torchrun otherwise)";
  sub->add_option("--rank", a->rank, "this process's rank in [0, --world-size)")->group(gp);
  sub->add_option("--world-size", a->world_size,
                  "number of processes that share the plan; each writes OUTPUT/ranks/...")
      ->group(gp);
  sub->add_option("--local-rank", a->local_rank,
                  "rank among this machine's processes: picks the GPU (default: the launcher's, "
                  "else the rank)")
      ->group(gp);
  auto* gr = "Run control";
  sub->add_flag("--resume", o.resume, "continue an interrupted store with the same settings")
      ->group(gr);
  sub->add_flag("--overwrite", o.overwrite, "replace an existing store in --output")->group(gr);
  sub->add_flag("--no-progress", a->no_progress, "no progress bar or progress lines")->group(gr);
  // -q and --log-level: main.cc defines them once for every subcommand.
  sub->callback([a] {
    data::check_split_option(a->o.split);
    CollectOptions opts = a->o;
    // One dtype vocabulary for every option (core/dtype.h): f16 = fp16 = float16 = half, ...
    const LogitsOption logits = parse_logits_option(a->logits);
    opts.logits_dtype = logits.dtype;
    opts.logits_topk = logits.topk;
    if (a->hidden != "none") {
      opts.hidden_dtype =
          parse_dtype_option("--hidden", a->hidden, {DType::kBF16, DType::kF32}, {"none"});
    }
    opts.precision = parse_precision_option("--precision", opts.precision);
    opts.audit = parse_audit_fraction(a->audit);
    for (const auto& r : a->data_roots) opts.data_roots.emplace_back(r);
    opts.catalog = a->catalog;
    opts.tokenizer = a->tokenizer;
    opts.progress = !a->no_progress && log_level() <= LogLevel::kInfo;  // -q: no bar either
    opts.launch = detect_launch(process_environment(), {a->rank, a->world_size, a->local_rank});
    opts.command_line = process_command_line({"moetrace", "collect"});
    const CollectResult r = run_collect(opts);
    if (r.interrupted) std::exit(128 + r.signal);  // 130 after Ctrl-C, 143 after SIGTERM
  });
});

}  // namespace
}  // namespace moetrace::cli
