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
  for (size_t k = 0; k < st.manifest["shards"].size(); ++k) {
    const std::string ew = what + ": shards[" + std::to_string(k) + "]";
    trace::ShardEntry e = trace::shard_entry_from_json(st.manifest["shards"][k], ew);
    if (e.first_sample != st.num_samples) {
      fail(ew, ": first_sample is ", e.first_sample, ", expected ", st.num_samples);
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
  const TensorView& logits = f.find(prefix + "router_logits")->view;
  l.router_logits.resize(n * e);
  convert_to_f32(logits.dtype,
                 static_cast<const uint8_t*>(logits.data) + r0 * e * dtype_size(logits.dtype),
                 l.router_logits.data(), n * e);
  const int32_t* ex = f.find(prefix + "expert")->view.as<int32_t>() + r0;
  l.expert.assign(ex, ex + n);
  const uint8_t* dr = f.find(prefix + "dropped")->view.as<uint8_t>() + r0;
  l.dropped.assign(dr, dr + n);
  const float* g = f.find(prefix + "gate")->view.as<float>() + r0;
  l.gate.assign(g, g + n);
  if (layout.hidden_dtype) {
    const TensorView& h = f.find(prefix + "hidden")->view;
    l.hidden.resize(n * d);
    convert_to_f32(h.dtype, static_cast<const uint8_t*>(h.data) + r0 * d * dtype_size(h.dtype),
                   l.hidden.data(), n * d);
  }
  return l;
}

}  // namespace

SampleRecordOwned TraceStore::sample(int64_t i) const {
  const State& st = *state_;
  if (i < 0 || i >= st.num_samples) {
    fail(st.dir.string(), ": sample ", i, " is out of range (the store holds ", st.num_samples,
         ")");
  }
  auto it =
      std::upper_bound(st.shards.begin(), st.shards.end(), i,
                       [](int64_t v, const trace::ShardEntry& e) { return v < e.first_sample; });
  const size_t k = static_cast<size_t>(it - st.shards.begin()) - 1;
  const auto loaded = st.shard(k);
  const SafetensorsFile& f = *loaded->file;
  const size_t j = static_cast<size_t>(i - st.shards[k].first_sample);

  SampleRecordOwned s;
  s.sample_id = loaded->meta.sample_ids[j];
  s.dataset = loaded->meta.datasets[j];
  s.row = loaded->meta.rows[j];
  s.synthetic = f.find("sample_kind")->view.as<uint8_t>()[j] != 0;
  const int64_t* off = f.find("sample_offsets")->view.as<int64_t>();
  const int64_t t0 = off[j], t1 = off[j + 1];
  const int32_t* tok = f.find("token_ids")->view.as<int32_t>();
  s.token_ids.assign(tok + t0, tok + t1);
  for (int b : st.layout.enc_layers) {
    s.enc.push_back(read_layer(f, st.layout, trace::layer_key(false, b) + ".", t0, t1 - t0));
  }
  if (st.layout.decoder) {
    const int64_t* doff = f.find("dec.sample_offsets")->view.as<int64_t>();
    const int64_t g0 = doff[j], g1 = doff[j + 1];
    const int32_t* in = f.find("dec.input_ids")->view.as<int32_t>();
    const int32_t* out = f.find("dec.output_ids")->view.as<int32_t>();
    s.dec_input_ids.assign(in + g0, in + g1);
    s.dec_output_ids.assign(out + g0, out + g1);
    for (int b : st.layout.dec_layers) {
      s.dec.push_back(read_layer(f, st.layout, trace::layer_key(true, b) + ".", g0, g1 - g0));
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
