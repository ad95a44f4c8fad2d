// The trace store (docs/TRACE_FORMAT.md, format versions 1 and 2): a directory of safetensors shards
// and a manifest.json. TraceWriter appends samples and commits whole shards atomically on background
// threads; TraceStore reads samples back; verify_store() checks a store against its manifest.
#pragma once

#include <cstdint>
#include <filesystem>
#include <functional>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <ostream>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "core/dtype.h"

namespace moetrace {

inline constexpr const char* kTraceFormat = "moetrace-trace";
// Version 2 adds top-k routing (expert/gate [T, k]), stores without `dropped`, the routing family
// and `--logits topk:K`. A store that uses none of them (Switch, default options) is written as
// version 1, byte for byte as before; readers take both.
inline constexpr int kTraceFormatVersion = 2;
inline constexpr int kTraceFormatVersionSwitch = 1;

// The routing families a store may record (manifest "routing.family"); switch keeps its layers as
// enc.{i} / dec.{i}, the decoder-only language models as lm.{i} (the prompt) / gen.{i} (greedy
// generation steps).
inline constexpr std::string_view kRoutingFamilies[] = {"switch", "olmoe", "mixtral", "qwen2_moe",
                                                        "qwen3_moe"};
bool is_routing_family(std::string_view family);
// True for the decoder-only language model families (every family but switch).
inline bool is_lm_family(std::string_view family) { return family != "switch"; }

// The one top-K rule of `--logits topk:K` (docs/TRACE_FORMAT.md): for each of `rows` rows of E
// fp32 logits, the K largest in descending order, ties to the lowest index (values [rows, K],
// ids [rows, K]), and lse [rows] = log(sum over all E of exp(logit)), summed in double around the
// largest logit and stored as fp32. 1 <= K <= E. NaN logits sort below every number (-inf too).
void router_topk(const float* logits, int64_t rows, int64_t E, int K, float* values, int32_t* ids,
                 float* lse);

// One MoE layer of one sample: S rows (S = tokens of the sample, or G decoder steps); k =
// StoreSettings::top_k. The pointers must stay valid during TraceWriter::add() only; add() copies
// them.
struct LayerRecord {
  const float* router_logits = nullptr;  // [S, E] fp32 (unused by a --logits topk:K store)
  const int32_t* expert = nullptr;       // [S, k] the router's choices in [0, E), descending weight
  const uint8_t* dropped = nullptr;      // [S] 0 or 1; nullptr when the store has no capacity
  const float* gate = nullptr;  // [S, k] their routing weights (Switch: the top-1 probability)
  // [S, d_model] fp32, or nullptr (zeros are stored if the store has hidden states)
  const float* hidden = nullptr;
  // Instead of router_logits / hidden: the same values in another dtype (F32, F16 or BF16), copied
  // byte for byte when it is the store's dtype (the GPU engine hands over F16 logits), else
  // converted. Used when non-null.
  const void* router_logits_raw = nullptr;
  DType router_logits_raw_dtype = DType::kF32;
  const void* hidden_raw = nullptr;
  DType hidden_raw_dtype = DType::kF32;
  // A --logits topk:K store (StoreSettings::logits_topk = K) takes these instead of the logits,
  // made by router_topk() from the fp32 logits: [S, K] values (stored as F16), [S, K] ids, [S] lse.
  const float* topk_logits = nullptr;
  const int32_t* topk_ids = nullptr;
  const float* lse = nullptr;
};

struct SampleRecord {
  std::string sample_id;  // <dataset>/<config>/<split>/<row>, unique in the store
  std::string dataset;    // catalog name, e.g. glue/mrpc
  int64_t row = 0;
  bool synthetic = false;
  std::vector<int32_t> token_ids;  // [S]
  std::vector<LayerRecord> enc;    // one per StoreSettings::enc_layers, same order
  std::vector<int32_t> dec_input_ids, dec_output_ids;  // [G] (only with decoder)
  std::vector<LayerRecord> dec;                        // one per dec_layers, G rows each
};

// A layer of a sample read back from a store; logits and hidden widened to fp32.
struct LayerRecordOwned {
  std::vector<float> router_logits;  // [S * E]; empty in a --logits topk:K store
  std::vector<int32_t> expert;       // [S * k]
  std::vector<uint8_t> dropped;      // [S]; empty when the store has no capacity
  std::vector<float> gate;           // [S * k]
  std::vector<float> hidden;         // [S * d_model], empty when the store has no hidden states
  // --logits topk:K stores only (else empty): [S * K] values, [S * K] ids, [S] log-sum-exp.
  std::vector<float> topk_logits;
  std::vector<int32_t> topk_ids;
  std::vector<float> lse;
};

struct SampleRecordOwned {
  std::string sample_id, dataset;
  int64_t row = 0;
  bool synthetic = false;
  std::vector<int32_t> token_ids;
  std::vector<LayerRecordOwned> enc;
  std::vector<int32_t> dec_input_ids, dec_output_ids;
  std::vector<LayerRecordOwned> dec;
};

// One rank's share of a data-parallel collection (docs/SCALING.md): the global samples
// [first_sample, first_sample + num_samples) of total_samples. first_sample is a multiple of
// samples_per_shard, so the rank's shards are exactly the shards a single process would write
// (same global numbers and contents); they live in STORE/ranks/rank-RRRRR-of-WWWWW/.
struct StorePart {
  int rank = 0, world_size = 1;
  int64_t first_sample = 0, num_samples = 0, total_samples = 0;
};

struct StoreSettings {
  nlohmann::json settings;  // manifest "settings" (sampling/run parameters); compared on resume
  // manifest "model" (id, files, config, tokenizer_sha256); compared on resume
  nlohmann::json model;
  std::vector<std::string> command_line;
  std::vector<int> enc_layers, dec_layers;  // block indices of the MoE layers
  int64_t num_experts = 0, d_model = 0;
  DType logits_dtype = DType::kF16;   // F32, F16 or BF16
  std::optional<DType> hidden_dtype;  // BF16 or F32; nullopt = no hidden states
  bool decoder = false;
  // Routing (docs/TRACE_FORMAT.md, "Routing"): the family (kRoutingFamilies; switch -> layers
  // enc./dec., the language models -> lm./gen.), experts per token (expert and gate are [T] for 1,
  // [T, top_k] above) and whether the model has expert capacity (`dropped` stored). The defaults
  // are Switch's, and a Switch store with them is written as format version 1.
  std::string family = "switch";
  int top_k = 1;
  bool dropped = true;
  // --logits topk:K: K > 0 stores router_topk_logits [T, K] F16, router_topk_ids [T, K] I32 and
  // router_lse [T] F32 instead of router_logits (logits_dtype is then F16, the values' dtype).
  int logits_topk = 0;
  // Shard boundaries depend on this only -> resume reproduces them.
  int64_t samples_per_shard = 1024;
  std::string device;  // manifest "device"
  // manifest "engine": what else changes the numbers (device kind, threads, batch tokens,
  // precision, BLAS); null = none. Not compared by TraceWriter: collect refuses a resume that
  // differs, naming the option.
  nlohmann::json engine;
  // kResume, >= 0: the committed shards from this sample on (a shard boundary) are computed again:
  // their samples are added again from this one (the caller recomputes them), and they stay
  // listed until the first new shard replaces them. For a store extended beyond the plan that
  // wrote it: that plan's last batching window was cut short, so its batches (and the logits'
  // rounding) differ from those of the larger plan. -1: none.
  int64_t redo_from_sample = -1;
  // Set for one rank's store of a data-parallel collection.
  std::optional<StorePart> part;
};

enum class OpenMode { kCreate, kResume, kOverwrite };

class TraceWriter {
 public:
  // kCreate: dir must not exist or be empty, else Error ("... use --resume or --overwrite").
  // kResume: dir must hold a store whose settings/model/layers/dtypes equal these (Error naming the
  //   first difference otherwise); committed shards are checked against their sha256; uncommitted
  //   leftovers (.tmp-*, unlisted shards) are removed. A partial last shard (left by
  //   commit_partial()) is loaded back and rewritten once it fills, so shard contents equal those
  //   of an uninterrupted run. If dir is empty or absent it behaves like kCreate.
  // kOverwrite: removes an existing store's files (manifest.json, shard-*.safetensors, .tmp-*;
  //   refuses if dir holds other files) and creates.
  // A new store gets a manifest with no shards and complete=false at once.
  static std::unique_ptr<TraceWriter> open(const std::filesystem::path& dir, const StoreSettings& s,
                                           OpenMode mode);
  ~TraceWriter();  // without finish(): waits for queued commits; the manifest keeps complete=false
  TraceWriter(const TraceWriter&) = delete;
  TraceWriter& operator=(const TraceWriter&) = delete;

  // Samples in the store when it was opened, plus those added since (a resumed run skips the first
  // committed_samples() of its plan). Equal to the number of add() calls the store has seen.
  int64_t committed_samples() const;
  // Samples whose shards are on disk and listed in the manifest now.
  int64_t durable_samples() const;

  // Copies and converts the sample into the current shard's buffers. When the shard reaches
  // samples_per_shard it is queued for the commit threads (several shards are written at once and
  // listed in order); add() blocks while as many shards as there are commit threads, plus one, or
  // 3 GiB are queued. Throws Error for a malformed record, or rethrows a commit thread's error
  // (e.g. a full disk) of an earlier commit.
  void add(const SampleRecord& sample);
  // The same for several samples in store order; their layer data is copied in parallel.
  void add(std::span<const SampleRecord> samples);
  // Waits until every queued shard is committed (durable and listed), or rethrows its error.
  void wait_for_commits();
  // Waits for queued commits, then commits the current partial shard now (the Ctrl-C path),
  // unless it would replace shards being computed again (redo_from_sample) by fewer samples.
  void commit_partial();
  // Commits the partial shard, waits for the commit threads, and writes the manifest with
  // complete=true; collection_time grows by collection_seconds_this_run.
  void finish(double collection_seconds_this_run);

 private:
  struct Impl;
  explicit TraceWriter(std::unique_ptr<Impl> impl);
  void commit_cur();  // waits for queued commits, commits the partial shard if it grew
  std::unique_ptr<Impl> impl_;
};

// The checks of TraceWriter::open(dir, s, kResume) that need no shard: the manifest parses and its
// layers, dtypes, samples_per_shard, part, settings and model equal s's (settings.traces and
// settings.num_samples may grow: the store is then extended with the next samples of the same
// plan; fewer are refused). Returns the manifest; Error naming the first difference otherwise.
nlohmann::json check_resume(const std::filesystem::path& dir, const StoreSettings& s);

// The advisory lock of a store directory: an exclusive flock() on DIR/.moetrace.lock (the file
// holds the holder's pid), created with DIR when missing. Held while the object lives; the kernel
// releases it when the process ends however it ends (exit, crash, kill -9). The file stays: it is
// not part of the store, and removing it would let two processes lock two different files.
inline constexpr const char* kStoreLockName = ".moetrace.lock";
class StoreLock {
 public:
  // Error "DIR: in use by another moetrace process (pid N); ..." when another process holds it.
  explicit StoreLock(const std::filesystem::path& dir);
  ~StoreLock();
  StoreLock(const StoreLock&) = delete;
  StoreLock& operator=(const StoreLock&) = delete;

 private:
  int fd_ = -1;
};

// Read access to a store: the shards the manifest lists, mapped lazily.
class TraceStore {
 public:
  // Parses manifest.json; refuses another format or an unknown format_version.
  static TraceStore open(const std::filesystem::path& dir);

  const std::filesystem::path& dir() const;
  const nlohmann::json& manifest() const;
  int64_t num_samples() const;
  int64_t num_shards() const;
  const std::vector<int>& enc_layers() const;
  const std::vector<int>& dec_layers() const;
  // Loads sample i (0 <= i < num_samples()): token ids and per-layer tensors, logits and hidden
  // widened to fp32. Throws Error naming the shard when it is missing or malformed.
  SampleRecordOwned sample(int64_t i) const;

 private:
  struct State;
  std::shared_ptr<State> state_;
};

// Full check: manifest structure, every listed shard exists, sizes and sha256 match, tensor names,
// shapes and dtypes agree with the manifest, sample_offsets monotone and ending at T, experts in
// [0, E), dropped and sample_kind in {0, 1}, sample ids unique, and every count of the manifest
// (expert_distribution, per_layer, dataset_distribution, totals) recomputed from the shards.
// Returns one line per problem (empty = OK). `progress` (optional) is called after each shard with
// the shards and bytes (per the manifest) checked so far and in all; hashing dominates the time.
using VerifyProgress = std::function<void(int64_t shards_done, int64_t shards_total,
                                          int64_t bytes_done, int64_t bytes_total)>;
std::vector<std::string> verify_store(const std::filesystem::path& dir,
                                      const VerifyProgress& progress = {});

// Data-parallel stores (docs/SCALING.md): STORE/ranks/rank-RRRRR-of-WWWWW/ holds rank R's own
// store (a manifest with "part"); STORE/manifest.json, written by merge_store(), lists the shards
// of every rank in global sample order.
std::filesystem::path rank_store_dir(const std::filesystem::path& store, int rank, int world_size);

// Checks STORE before rank `rank` of `world_size` opens its part with `mode` (world_size > 1), or
// before a single process opens STORE itself (world_size 1): refuses what the run must not mix
// with (a single-process store, parts of another world size, foreign files) in one line (Error).
// With kOverwrite, rank 0 (or the single process) removes those leftovers, and every rank removes
// a merged manifest that its overwrite makes stale. Creates STORE/ranks/ when world_size > 1.
void prepare_parallel_store(const std::filesystem::path& store, int rank, int world_size,
                            OpenMode mode);

struct MergeResult {
  bool merged = false;               // STORE/manifest.json written (every rank complete)
  int world_size = 0;                // 0 when STORE is a single-process store
  std::vector<std::string> pending;  // "rank 1 (40 of 67 samples)", ... when not merged
  int64_t num_samples = 0, num_shards = 0;
};
// Assembles STORE/manifest.json from the ranks' stores once all are complete: checks that they
// agree on everything but the rank, tile the samples without gaps, and that their listed shards
// exist with the listed sizes (contents: `moetrace verify`). Deterministic (same ranks -> same
// bytes) and atomic (a unique .tmp- name, fsync, rename), so ranks finishing together may both run
// it. Incomplete or missing ranks: returns merged=false with pending filled; inconsistent ones:
// Error. A single-process store is left as it is (world_size 0).
MergeResult merge_store(const std::filesystem::path& store);

// The manifest's "fidelity" object (`collect --audit`, src/collect/audit.h, docs/TRACE_FORMAT.md):
// how the stored routing of a subset of the samples compares with a float32 re-run of them.
struct FidelityCounts {
  int64_t tokens = 0;             // token rows compared (every token of the audited samples)
  int64_t top1_agree = 0;         // rows whose stored expert is the reference's
  double max_logit_error = 0;     // max |stored router logit - reference logit| (the stored value,
                                  // storage rounding included); kFidelityNonFinite when one is not
                                  // finite
  double top1_agreement() const;  // top1_agree / tokens; 1 when no token was compared
};
inline constexpr double kFidelityNonFinite = 3.4028234663852886e38;  // FLT_MAX
struct Fidelity {
  bool measured = false;           // "status": "measured", or "skipped" with the reason
  std::string reason;              // why nothing was re-run (skipped only)
  std::string reference = "fp32";  // the re-run's precision
  std::string precision;           // the stored routing's (the engine's --precision)
  double fraction = 0;             // collect --audit
  int64_t samples = 0;             // samples re-run
  double seconds = 0;              // the audit's wall time, reference model load included
  std::vector<std::pair<std::string, FidelityCounts>> per_layer;  // "enc.{i}", block order
  FidelityCounts total;  // every layer: counts summed, the largest error
};
// Writes f as the "fidelity" object of the complete store in dir (replacing one that is there;
// every other field stays as it is), atomically. Error when dir holds no complete store.
void set_store_fidelity(const std::filesystem::path& dir, const Fidelity& f);
// The "fidelity" object of a manifest, bound-checked against its layout (per_layer: exactly its
// encoder MoE layers; counts, agreement and totals consistent); nullopt when it has none. Error
// naming the field otherwise.
std::optional<Fidelity> manifest_fidelity(const nlohmann::json& manifest, const std::string& what);

// The manifest's summary (for `moetrace inspect STORE [--json]`, keys in docs/TRACE_FORMAT.md);
// reads no shard. Error naming the field when one has the wrong type.
nlohmann::json store_summary_json(const std::filesystem::path& dir);
// The same, human-readable.
void print_store_summary(const std::filesystem::path& dir, std::ostream& out);

// True when dir holds a manifest.json whose "format" is "moetrace-trace".
bool is_trace_store(const std::filesystem::path& dir);

}  // namespace moetrace
