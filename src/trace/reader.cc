// TraceStore: reads samples back from the shards a manifest lists.
#include <algorithm>
#include <fstream>
#include <mutex>

#include "core/error.h"
#include "io/safetensors.h"
#include "trace/schema.h"
#include "trace/store.h"

namespace moetrace {

namespace fs = std::filesystem;
using json = nlohmann::json;

struct TraceStore::State {
  fs::path dir;
  json manifest;
  trace::Layout layout;
  std::vector<trace::ShardEntry> shards;
  int64_t num_samples = 0;
  int64_t base = 0;  // global index of sample 0: a rank's part starts at its first sample

  struct Loaded {
    std::shared_ptr<SafetensorsFile> file;
    trace::ShardMeta meta;
  };
  mutable std::mutex mu;
  mutable std::vector<std::shared_ptr<Loaded>> loaded;  // per shard, opened on first use

  // Maps shard k and checks it once (offsets and ranges), so sample() may index it freely.
  std::shared_ptr<Loaded> shard(size_t k) const {
    std::lock_guard<std::mutex> lock(mu);
    if (!loaded[k]) {
      auto l = std::make_shared<Loaded>();
      l->file = std::make_shared<SafetensorsFile>(SafetensorsFile::open(dir / shards[k].file));
      trace::check_shard(*l->file, layout, shards[k].first_sample, &l->meta);
      if (static_cast<int64_t>(l->meta.sample_ids.size()) != shards[k].num_samples) {
        fail((dir / shards[k].file).string(), ": holds ", l->meta.sample_ids.size(),
             " samples, the manifest says ", shards[k].num_samples);
      }
      loaded[k] = std::move(l);
    }
    return loaded[k];
  }
};

TraceStore TraceStore::open(const fs::path& dir) {
  TraceStore s;
  s.state_ = std::make_shared<State>();
  State& st = *s.state_;
  st.dir = dir;
  st.manifest = trace::read_manifest(dir);
  const std::string what = (dir / trace::kManifestName).string();
  st.layout = trace::layout_from_manifest(st.manifest, what);
  if (!st.manifest.contains("shards") || !st.manifest["shards"].is_array()) {
    fail(what, ": \"shards\" must be an array");
  }
  if (st.manifest.contains("part"))
    st.base = trace::part_from_json(st.manifest["part"], what).first_sample;
  for (size_t k = 0; k < st.manifest["shards"].size(); ++k) {
    const std::string ew = what + ": shards[" + std::to_string(k) + "]";
    trace::ShardEntry e = trace::shard_entry_from_json(st.manifest["shards"][k], ew);
    if (e.first_sample != st.base + st.num_samples) {
      fail(ew, ": first_sample is ", e.first_sample, ", expected ", st.base + st.num_samples);
    }
    st.num_samples += e.num_samples;
    st.shards.push_back(std::move(e));
  }
  st.loaded.resize(st.shards.size());
  return s;
}

const fs::path& TraceStore::dir() const { return state_->dir; }
const json& TraceStore::manifest() const { return state_->manifest; }
int64_t TraceStore::num_samples() const { return state_->num_samples; }
int64_t TraceStore::num_shards() const { return static_cast<int64_t>(state_->shards.size()); }
const std::vector<int>& TraceStore::enc_layers() const { return state_->layout.enc_layers; }
const std::vector<int>& TraceStore::dec_layers() const { return state_->layout.dec_layers; }

namespace {

LayerRecordOwned read_layer(const SafetensorsFile& f, const trace::Layout& layout,
                            const std::string& prefix, int64_t row0, int64_t rows) {
  LayerRecordOwned l;
  const size_t n = static_cast<size_t>(rows);
  const size_t e = static_cast<size_t>(layout.num_experts);
  const size_t d = static_cast<size_t>(layout.d_model);
  const size_t r0 = static_cast<size_t>(row0);
  const size_t k = static_cast<size_t>(layout.top_k);
  const size_t K = static_cast<size_t>(layout.logits_topk);
  auto view = [&](const char* name) -> const TensorView& { return f.find(prefix + name)->view; };
  if (K > 0) {
    l.topk_logits = trace::read_f32_rows(view("router_topk_logits"), r0, n, K);
    l.topk_ids = trace::read_elems<int32_t>(view("router_topk_ids"), r0 * K, n * K);
    l.lse = trace::read_elems<float>(view("router_lse"), r0, n);
  } else {
    l.router_logits = trace::read_f32_rows(view("router_logits"), r0, n, e);
  }
  l.expert = trace::read_elems<int32_t>(view("expert"), r0 * k, n * k);
  if (layout.dropped) l.dropped = trace::read_elems<uint8_t>(view("dropped"), r0, n);
  l.gate = trace::read_elems<float>(view("gate"), r0 * k, n * k);
  if (layout.hidden_dtype) l.hidden = trace::read_f32_rows(view("hidden"), r0, n, d);
  return l;
}

}  // namespace

SampleRecordOwned TraceStore::sample(int64_t i) const {
  const State& st = *state_;
  if (i < 0 || i >= st.num_samples) {
    fail(st.dir.string(), ": sample ", i, " is out of range (the store holds ", st.num_samples,
         ")");
  }
  const int64_t g = st.base + i;  // global sample index
  auto it =
      std::upper_bound(st.shards.begin(), st.shards.end(), g,
                       [](int64_t v, const trace::ShardEntry& e) { return v < e.first_sample; });
  const size_t k = static_cast<size_t>(it - st.shards.begin()) - 1;
  const auto loaded = st.shard(k);
  const SafetensorsFile& f = *loaded->file;
  const size_t j = static_cast<size_t>(g - st.shards[k].first_sample);

  SampleRecordOwned s;
  s.sample_id = loaded->meta.sample_ids[j];
  s.dataset = loaded->meta.datasets[j];
  s.row = loaded->meta.rows[j];
  auto view = [&](const char* name) -> const TensorView& { return f.find(name)->view; };
  s.synthetic = trace::read_elems<uint8_t>(view("sample_kind"), j, 1)[0] != 0;
  const std::vector<int64_t> off = trace::read_elems<int64_t>(view("sample_offsets"), j, 2);
  const int64_t t0 = off[0], t1 = off[1];
  s.token_ids = trace::read_elems<int32_t>(view("token_ids"), static_cast<size_t>(t0),
                                           static_cast<size_t>(t1 - t0));
  for (int b : st.layout.enc_layers) {
    s.enc.push_back(
        read_layer(f, st.layout, trace::layer_key(st.layout, false, b) + ".", t0, t1 - t0));
  }
  if (st.layout.decoder) {
    auto gen = [&](const char* name) -> const TensorView& {
      return f.find(trace::gen_tensor(st.layout, name))->view;
    };
    const std::vector<int64_t> doff = trace::read_elems<int64_t>(gen("sample_offsets"), j, 2);
    const int64_t g0 = doff[0], g1 = doff[1];
    const size_t g = static_cast<size_t>(g1 - g0);
    s.dec_input_ids = trace::read_elems<int32_t>(gen("input_ids"), static_cast<size_t>(g0), g);
    s.dec_output_ids = trace::read_elems<int32_t>(gen("output_ids"), static_cast<size_t>(g0), g);
    for (int b : st.layout.dec_layers) {
      s.dec.push_back(
          read_layer(f, st.layout, trace::layer_key(st.layout, true, b) + ".", g0, g1 - g0));
    }
  }
  return s;
}

bool is_trace_store(const fs::path& dir) {
  std::ifstream in(dir / trace::kManifestName, std::ios::binary);
  if (!in) return false;
  try {
    const json m = json::parse(in);
    return m.is_object() && m.contains("format") && m["format"] == kTraceFormat;
  } catch (const json::exception&) {
    return false;
  }
}

}  // namespace moetrace
