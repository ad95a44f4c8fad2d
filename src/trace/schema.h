// Internal to src/trace: the shard schema, the counts the manifest carries, and the checks shared
// by the writer (resume), the reader and verify_store(). Names follow docs/TRACE_FORMAT.md.
#pragma once

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "io/safetensors.h"
#include "trace/store.h"

namespace moetrace::trace {

using json = nlohmann::json;

inline constexpr const char* kManifestName = "manifest.json";
inline constexpr const char* kTmpPrefix = ".tmp-";
// Data-parallel stores: rank r of W writes its part into ranks/rank-RRRRR-of-WWWWW/.
inline constexpr const char* kRanksDir = "ranks";

// "shard-00042.safetensors"
std::string shard_file_name(int64_t index);
// True for "shard-<digits>.safetensors"; *index gets the number.
bool parse_shard_file_name(const std::string& name, int64_t* index);
// Files a store owns: manifest.json, shard-*.safetensors and .tmp-* leftovers.
bool is_store_file(const std::string& name);
// "rank-00001-of-00003"
std::string rank_dir_name(int rank, int world_size);
// True for "rank-<5+ digits>-of-<5+ digits>" with rank < world_size.
bool parse_rank_dir_name(const std::string& name, int* rank, int* world_size);
// A manifest's shard path: "shard-N.safetensors" (rank_dir empty) or
// "ranks/rank-R-of-W/shard-N.safetensors" (a merged data-parallel store). Nothing else, so that no
// manifest can point outside its store.
bool parse_shard_path(const std::string& path, int64_t* index, std::string* rank_dir);

// What the shards of a store hold (fixed for the life of the store).
struct Layout {
  std::vector<int> enc_layers, dec_layers;
  int64_t num_experts = 0, d_model = 0;
  DType logits_dtype = DType::kF16;
  std::optional<DType> hidden_dtype;
  bool decoder = false;
  int64_t samples_per_shard = 0;
  // Routing (StoreSettings): family, experts per token, capacity (`dropped` stored), and the K of
  // --logits topk:K (0: full router_logits).
  std::string family = "switch";
  int top_k = 1;
  bool dropped = true;
  int logits_topk = 0;
  // The version the store is written as: 1 when every field above has Switch's default, else 2.
  int format_version() const;
  bool lm() const { return is_lm_family(family); }
};

// "enc.3" / "dec.5" (Switch), "lm.3" / "gen.3" (a language model): the prefix of a MoE layer's
// tensors and its per_layer key; decoder = the generation stack.
std::string layer_key(const Layout& layout, bool decoder, int block);
// A generation stack's own tensor: "dec.input_ids" (Switch) or "gen.input_ids" (a language model).
std::string gen_tensor(const Layout& layout, const char* name);
// The "routing" manifest object of a version-2 store: {"family", "top_k", "dropped"}.
json routing_json(const Layout& layout);
// Reads the layout fields of a manifest; throws Error naming the field when one is missing or
// wrong.
Layout layout_from_manifest(const json& manifest, const std::string& what);
// "none", "BF16", "F32"
std::string hidden_dtype_name(const std::optional<DType>& t);

struct LayerStats {
  std::vector<int64_t> expert_counts;  // [E] choices: each of a token's k experts counts once
  int64_t dropped = 0;
  int64_t tokens = 0;
};

// Counts of a set of samples (one shard, or the whole store), from which the manifest's statistics
// are derived.
struct Stats {
  int64_t num_samples = 0, num_tokens = 0, num_decoder_tokens = 0;
  std::map<std::string, LayerStats> layers;        // "enc.{i}" / "dec.{i}"
  std::map<std::string, int64_t> dataset_samples;  // samples per dataset
  void add(const Stats& other);
};
Stats empty_stats(const Layout& layout);
// Adds n rows of one layer: expert [n, k] (already checked to lie in [0, E)), dropped [n] or
// nullptr (a store without capacity).
void count_rows(LayerStats* s, const int32_t* expert, int k, const uint8_t* dropped, int64_t n);

// The manifest's count fields derived from the totals: num_samples, num_tokens, num_decoder_tokens,
// total_traces, expert_distribution, experts_used, diversity_percentage, dataset_distribution,
// per_layer.
json stats_fields(const Stats& totals, const Layout& layout);

// One manifest "shards" entry.
struct ShardEntry {
  std::string file;
  int64_t first_sample = 0, num_samples = 0, num_tokens = 0, num_decoder_tokens = 0;
  int64_t bytes = 0;
  std::string sha256;
};
json shard_entry_json(const ShardEntry& e);
ShardEntry shard_entry_from_json(const json& j, const std::string& what);  // throws Error

using Part = StorePart;
json part_json(const Part& p);
Part part_from_json(const json& j, const std::string& what);  // throws Error

// Everything a manifest.json holds; build_manifest() lays it out in the documented field order.
struct ManifestFields {
  bool complete = false;
  std::vector<std::string> command_line;
  json settings, model;  // null = {}
  Layout layout;
  std::optional<Part> part;              // one rank's store
  nlohmann::ordered_json data_parallel;  // merged store: {"world_size", "ranks": [...]}, else null
  std::vector<ShardEntry> shards;
  Stats totals;
  double collection_time = 0;
  std::string device;
  json engine;                       // null: no "engine" field (stores written before it)
  std::optional<Fidelity> fidelity;  // "fidelity" (last) when set
};
nlohmann::ordered_json build_manifest(const ManifestFields& f);
// The counts of a manifest (num_*, per_layer, dataset_distribution) as Stats; throws Error.
Stats stats_from_manifest(const json& m, const Layout& layout, const std::string& what);

// The manifest's "fidelity" object (store.h Fidelity) in its documented field order, and back
// (bound-checked against the layout: per_layer holds exactly its encoder MoE layers; Error naming
// the field otherwise).
nlohmann::ordered_json fidelity_json(const Fidelity& f);
Fidelity fidelity_from_json(const json& j, const Layout& layout, const std::string& what);
// The fidelity of a merged data-parallel store from its ranks' (in rank order): measured when every
// rank's is, with the same reference, precision and fraction (counts summed, the largest errors,
// samples summed, the longest audit); skipped when every rank's is, for one reason; else none.
std::optional<Fidelity> merge_fidelity(const std::vector<std::optional<Fidelity>>& ranks);

// A shard's per-sample metadata, parsed from its safetensors __metadata__.
struct ShardMeta {
  int64_t first_sample = 0;
  std::vector<std::string> sample_ids, datasets;
  std::vector<int64_t> rows;
};

// Checks one shard against the layout: metadata, the exact tensor set with shapes and dtypes,
// offsets, value ranges; returns its counts. Throws Error naming the file (and tensor) at the first
// problem. meta (optional) receives the parsed metadata.
Stats check_shard(const SafetensorsFile& f, const Layout& layout, int64_t expected_first_sample,
                  ShardMeta* meta);

// Elements [begin, begin + n) of a tensor as T. Tensors of a shard may sit at any byte offset
// (safetensors packs them without padding), so typed reads copy instead of casting the pointer.
template <class T>
std::vector<T> read_elems(const TensorView& v, size_t begin, size_t n) {
  std::vector<T> out(n);
  if (n > 0)
    std::memcpy(out.data(), static_cast<const uint8_t*>(v.data) + begin * sizeof(T), n * sizeof(T));
  return out;
}
// n * width elements of an F32, F16 or BF16 tensor from row row0 on, widened to fp32.
std::vector<float> read_f32_rows(const TensorView& v, size_t row0, size_t rows, size_t width);

// Writes bytes to dir/.tmp-<name><tmp_suffix>, fsyncs it, renames it to dir/<name> and fsyncs dir.
// Writers that may race on one name (ranks merging at once) pass a suffix unique to the process.
void atomic_write_file(const std::filesystem::path& dir, const std::string& name,
                       const std::string& bytes, const std::string& tmp_suffix = "");
void fsync_file(const std::filesystem::path& path);
void fsync_dir(const std::filesystem::path& dir);

// Reads and parses dir/manifest.json, checking format and format_version; throws Error.
json read_manifest(const std::filesystem::path& dir);

}  // namespace moetrace::trace
