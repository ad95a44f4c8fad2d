// `moetrace collect`: plan -> tokenize -> batch -> engine -> capture -> store, a pipeline of named
// stages (collect/pipeline.h) on any engine (engine/engine.h).
#pragma once

#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "collect/launcher.h"
#include "core/dtype.h"
#include "model/engine_io.h"  // kDefaultBatchTokens*, kBatchOverheadTokens*

namespace moetrace {

struct CollectOptions {
  // The seed system's options, same meanings.
  int64_t traces = 3000;  // a trace is one (sample, encoder MoE layer) pair
  std::string model;      // directory, Hub id, "demo"; empty: largest cached switch-base, else demo
  std::string output = "routing_data/traces";
  std::string mode = "real";  // real | synthetic | mixed
  double real_ratio = 0.5;
  // Data.
  // empty: every catalog dataset present locally (else the bundled rows), or "demo" with the demo
  // model; also files and folders (data/selection.h)
  std::string datasets;
  std::string split = "catalog";  // train | validation | test | catalog
  std::vector<std::filesystem::path> data_roots;
  std::filesystem::path catalog;  // extra dataset spec file
  uint64_t seed = 0;
  int max_length = 256;
  std::filesystem::path tokenizer;  // spiece.model; default: the one beside the checkpoint
  // Engine.
  std::string device = "auto";  // auto | cpu | cuda | cuda:N (auto: a visible GPU, else cpu)
  int threads = 0;
  int64_t batch_tokens = 0;  // batch size × padded length; 0: kDefaultBatchTokensCpu/Cuda
  std::optional<int64_t> batch_overhead;  // length_batches' cost of a batch; kBatchOverheadTokens*
  std::string precision = "bf16";  // cuda only: bf16 | fp16 | fp32 | mixed | faithful (docs/GPU.md)
  // What to store.
  DType logits_dtype = DType::kF16;
  // --logits topk:K: K > 0 stores the K largest logits, their experts and the log-sum-exp instead
  // of every logit (logits_dtype is then F16, the values' dtype).
  int logits_topk = 0;
  std::optional<DType> hidden_dtype;
  bool decoder = false;
  int max_new_tokens = 32;
  int64_t samples_per_shard = 1024;
  // --batch-window: how many samples (whole shards) are batched together; 0: auto_batch_window().
  int64_t batch_window = 0;
  // The fidelity audit (collect/audit.h): share of the samples re-run at fp32 once the store is
  // complete (at least one batch of them); 0 = off.
  double audit = 0.01;
  // Run control.
  bool resume = false;
  bool overwrite = false;
  bool progress = true;
  std::vector<std::string> command_line;
  // Data-parallel collection (docs/SCALING.md): with world_size > 1 this process collects its
  // rank's block of the plan into output/ranks/rank-RRRRR-of-WWWWW/.
  LaunchInfo launch;
};

struct CollectResult {
  int64_t samples = 0, tokens = 0, traces = 0;
  double seconds = 0;         // the whole run
  double loop_seconds = 0;    // tokenize -> engine -> store, after the model and plan are ready
  double engine_seconds = 0;  // inside the engine (forward + observation copies)
  bool interrupted = false;   // stopped by SIGINT or SIGTERM; what was complete is committed
  int signal = 0;             // which one
};

CollectResult run_collect(const CollectOptions& options);

// The one parser of --logits: f32 | f16 | bf16 (parse_dtype_option's names) or topk:K (K >= 1; the
// K largest logits as F16 with their experts and the log-sum-exp, docs/TRACE_FORMAT.md). Error
// naming the option and the value otherwise.
struct LogitsOption {
  DType dtype = DType::kF16;
  int topk = 0;  // 0: every logit, in dtype
};
LogitsOption parse_logits_option(std::string_view value);

// The order of real and synthetic samples in a mixed run: sample k is real iff
// floor((k+1)·r) > floor(k·r), which interleaves them evenly and gives round(n·r) real ones in all.
bool mixed_is_real(int64_t k, double ratio);

}  // namespace moetrace
