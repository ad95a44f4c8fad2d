#include "trace/schema.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <numeric>
#include <set>
#include <sstream>

#include "core/error.h"
#include "core/keys.h"
#include "trace/store.h"

#ifndef MOETRACE_VERSION
#define MOETRACE_VERSION "unknown"
#endif

namespace moetrace::trace {

namespace fs = std::filesystem;

std::string shard_file_name(int64_t index) {
  char buf[64];
  std::snprintf(buf, sizeof(buf), "shard-%05lld.safetensors", static_cast<long long>(index));
  return buf;
}

bool parse_shard_file_name(const std::string& name, int64_t* index) {
  const std::string prefix = "shard-", suffix = ".safetensors";
  if (name.size() <= prefix.size() + suffix.size() || name.rfind(prefix, 0) != 0 ||
      name.compare(name.size() - suffix.size(), suffix.size(), suffix) != 0) {
    return false;
  }
  const std::string digits =
      name.substr(prefix.size(), name.size() - prefix.size() - suffix.size());
  if (digits.size() > 15) return false;
  int64_t v = 0;
  for (char c : digits) {
    if (c < '0' || c > '9') return false;
    v = v * 10 + (c - '0');
  }
  *index = v;
  return true;
}

bool is_store_file(const std::string& name) {
  int64_t index;
  return name == kManifestName || name.rfind(kTmpPrefix, 0) == 0 ||
         parse_shard_file_name(name, &index);
}

std::string rank_dir_name(int rank, int world_size) {
  char buf[64];
  std::snprintf(buf, sizeof(buf), "rank-%05d-of-%05d", rank, world_size);
  return buf;
}

namespace {

// Parses all of s as a decimal number of at most 9 digits.
bool parse_digits(const std::string& s, int* v) {
  if (s.empty() || s.size() > 9) return false;
  int x = 0;
  for (char c : s) {
    if (c < '0' || c > '9') return false;
    x = x * 10 + (c - '0');
  }
  *v = x;
  return true;
}

}  // namespace

bool parse_rank_dir_name(const std::string& name, int* rank, int* world_size) {
  const std::string prefix = "rank-", mid = "-of-";
  if (name.rfind(prefix, 0) != 0) return false;
  const size_t m = name.find(mid, prefix.size());
  if (m == std::string::npos) return false;
  const std::string a = name.substr(prefix.size(), m - prefix.size());
  const std::string b = name.substr(m + mid.size());
  int r = 0, w = 0;
  if (a.size() < 5 || b.size() < 5 || !parse_digits(a, &r) || !parse_digits(b, &w) || w < 1 ||
      r >= w || name != rank_dir_name(r, w)) {
    return false;
  }
  *rank = r;
  *world_size = w;
  return true;
}

bool parse_shard_path(const std::string& path, int64_t* index, std::string* rank_dir) {
  const size_t slash = path.rfind('/');
  if (slash == std::string::npos) {
    rank_dir->clear();
    return parse_shard_file_name(path, index);
  }
  const std::string dir = path.substr(0, slash);
  const std::string prefix = std::string(kRanksDir) + "/";
  int r, w;
  if (dir.rfind(prefix, 0) != 0 || !parse_rank_dir_name(dir.substr(prefix.size()), &r, &w)) {
    return false;
  }
  if (!parse_shard_file_name(path.substr(slash + 1), index)) return false;
  *rank_dir = dir;
  return true;
}

int Layout::format_version() const {
  const bool switch_v1 = family == "switch" && top_k == 1 && dropped && logits_topk == 0;
  return switch_v1 ? kTraceFormatVersionSwitch : kTraceFormatVersion;
}

std::string layer_key(const Layout& layout, bool decoder, int block) {
  return keys::layer(keys::stack_of(decoder, layout.lm()), block);
}

std::string gen_tensor(const Layout& layout, const char* name) {
  return std::string(keys::stack_prefix(keys::stack_of(true, layout.lm()))) + "." + name;
}

json routing_json(const Layout& layout) {
  return {{"family", layout.family}, {"top_k", layout.top_k}, {"dropped", layout.dropped}};
}

std::string hidden_dtype_name(const std::optional<DType>& t) {
  return t ? std::string(dtype_name(*t)) : std::string("none");
}

namespace {

const json& field(const json& j, const char* key, const std::string& what) {
  if (!j.is_object() || !j.contains(key)) fail(what, ": missing field \"", key, "\"");
  return j.at(key);
}

// Counts read from a manifest drive allocations and sums: each has a ceiling far above any real
// store (docs/TRACE_FORMAT.md, "Limits"), so a hostile manifest gets one line instead of gigabytes.
constexpr int64_t kMaxCount = int64_t{1} << 50;  // samples, tokens, bytes: sums cannot overflow
constexpr int64_t kMaxExperts = 65536;           // as a model config.json may declare
constexpr int64_t kMaxDModel = int64_t{1} << 16;
constexpr size_t kMaxLayers = 1024;                          // per list (encoder, decoder)
constexpr int64_t kMaxLayerExpertCounts = int64_t{1} << 22;  // MoE layers × experts
constexpr int64_t kMaxSamplesPerShard = int64_t{1} << 30;

int64_t int_field(const json& j, const char* key, const std::string& what, int64_t min_value,
                  int64_t max_value = kMaxCount) {
  const json& v = field(j, key, what);
  if (!v.is_number_integer() || (v.is_number_unsigned() && v.get<uint64_t>() > INT64_MAX) ||
      v.get<int64_t>() < min_value || v.get<int64_t>() > max_value) {
    fail(what, ": field \"", key, "\" must be an integer in [", min_value, ", ", max_value,
         "], got ", v.dump());
  }
  return v.get<int64_t>();
}

std::vector<int> layer_list(const json& j, const std::string& what) {
  if (!j.is_array()) fail(what, ": must be an array of block indices");
  if (j.size() > kMaxLayers) fail(what, ": lists ", j.size(), " layers (at most ", kMaxLayers, ")");
  std::vector<int> out;
  for (const json& v : j) {
    if (!v.is_number_integer() || v.get<int64_t>() < 0 || v.get<int64_t>() > 100000) {
      fail(what, ": bad block index ", v.dump());
    }
    out.push_back(v.get<int>());
  }
  std::set<int> uniq(out.begin(), out.end());
  if (uniq.size() != out.size()) fail(what, ": repeated block index");
  return out;
}

}  // namespace

Layout layout_from_manifest(const json& m, const std::string& what) {
  Layout l;
  const json& layers = field(m, "layers", what);
  l.enc_layers = layer_list(field(layers, "encoder", what + ": layers"), what + ": layers.encoder");
  l.dec_layers = layer_list(field(layers, "decoder", what + ": layers"), what + ": layers.decoder");
  l.num_experts = int_field(m, "num_experts", what, 1, kMaxExperts);
  l.d_model = int_field(m, "d_model", what, 1, kMaxDModel);
  // Statistics hold one count per layer and expert (empty_stats, stats_fields).
  const int64_t n_layers = static_cast<int64_t>(l.enc_layers.size() + l.dec_layers.size());
  if (n_layers * l.num_experts > kMaxLayerExpertCounts) {
    fail(what, ": ", n_layers, " MoE layers of ", l.num_experts, " experts are more than ",
         kMaxLayerExpertCounts, " (layer, expert) counts");
  }
  // The storage fields may be absent in stores of other writers (e.g. numpy-made test stores):
  // they are then taken from "settings" and the first shard.
  const json& settings =
      m.contains("settings") && m["settings"].is_object() ? m["settings"] : json();
  auto storage = [&](const char* key) -> const json& {
    if (m.contains(key)) return m[key];
    if (settings.contains(key)) return settings[key];
    fail(what, ": missing field \"", key, "\"");
  };
  if (m.contains("samples_per_shard")) {
    l.samples_per_shard = int_field(m, "samples_per_shard", what, 1, kMaxSamplesPerShard);
  } else {
    const json& sh = m.contains("shards") ? m["shards"] : json();
    l.samples_per_shard = 1;
    if (sh.is_array() && !sh.empty() && sh[0].is_object() && sh[0].contains("num_samples") &&
        sh[0]["num_samples"].is_number_integer()) {
      l.samples_per_shard =
          std::clamp<int64_t>(sh[0]["num_samples"].get<int64_t>(), 1, kMaxSamplesPerShard);
    }
  }
  const json& ld = storage("logits_dtype");
  if (!ld.is_string() || !parse_dtype(ld.get<std::string>(), &l.logits_dtype) ||
      (l.logits_dtype != DType::kF32 && l.logits_dtype != DType::kF16 &&
       l.logits_dtype != DType::kBF16)) {
    fail(what, ": logits_dtype must be \"F32\", \"F16\" or \"BF16\", got ", ld.dump());
  }
  const json& hd = storage("hidden_dtype");
  DType h;
  if (hd == "none") {
    l.hidden_dtype.reset();
  } else if (hd.is_string() && parse_dtype(hd.get<std::string>(), &h) &&
             (h == DType::kBF16 || h == DType::kF32)) {
    l.hidden_dtype = h;
  } else {
    fail(what, ": hidden_dtype must be \"none\", \"BF16\" or \"F32\", got ", hd.dump());
  }
  const json& dec = m.contains("decoder") || settings.contains("decoder")
                        ? storage("decoder")
                        : json(!l.dec_layers.empty());
  if (!dec.is_boolean()) fail(what, ": decoder must be true or false");
  l.decoder = dec.get<bool>();
  if (!l.decoder && !l.dec_layers.empty()) {
    fail(what, ": layers.decoder is not empty but decoder is false");
  }
  // Version 2: "routing" (absent: Switch's top-1 with capacity) and "logits_topk" (absent: full
  // router_logits).
  if (m.contains("routing")) {
    const json& r = m["routing"];
    const std::string rw = what + ": routing";
    const json& fam = field(r, "family", rw);
    if (!fam.is_string() || !is_routing_family(fam.get<std::string>())) {
      std::string names;
      for (std::string_view f : kRoutingFamilies)
        names += (names.empty() ? "" : ", ") + std::string(f);
      fail(rw, ": family must be one of ", names, ", got ", fam.dump());
    }
    l.family = fam.get<std::string>();
    l.top_k = static_cast<int>(int_field(r, "top_k", rw, 1, l.num_experts));
    const json& dr = field(r, "dropped", rw);
    if (!dr.is_boolean()) fail(rw, ": field \"dropped\" must be true or false");
    l.dropped = dr.get<bool>();
  }
  if (m.contains("logits_topk")) {
    l.logits_topk = static_cast<int>(int_field(m, "logits_topk", what, 1, l.num_experts));
    if (l.logits_dtype != DType::kF16) {
      fail(what,
           ": logits_dtype must be \"F16\" with logits_topk (the stored top-K values' dtype)");
    }
  }
  const json& v = m.contains("format_version") ? m["format_version"] : json();
  if (v.is_number_integer() && v.get<int64_t>() != l.format_version()) {
    fail(what, ": format_version ", v.dump(), " does not match its layout (version ",
         l.format_version(), ": version 1 is Switch top-1 with capacity and full router_logits)");
  }
  return l;
}

void Stats::add(const Stats& o) {
  num_samples += o.num_samples;
  num_tokens += o.num_tokens;
  num_decoder_tokens += o.num_decoder_tokens;
  for (const auto& [key, ls] : o.layers) {
    LayerStats& d = layers[key];
    if (d.expert_counts.size() < ls.expert_counts.size())
      d.expert_counts.resize(ls.expert_counts.size());
    for (size_t e = 0; e < ls.expert_counts.size(); ++e) d.expert_counts[e] += ls.expert_counts[e];
    d.dropped += ls.dropped;
    d.tokens += ls.tokens;
  }
  for (const auto& [name, n] : o.dataset_samples) dataset_samples[name] += n;
}

Stats empty_stats(const Layout& layout) {
  Stats s;
  const size_t e = static_cast<size_t>(layout.num_experts);
  for (int b : layout.enc_layers) s.layers[layer_key(layout, false, b)].expert_counts.assign(e, 0);
  for (int b : layout.dec_layers) s.layers[layer_key(layout, true, b)].expert_counts.assign(e, 0);
  return s;
}

void count_rows(LayerStats* s, const int32_t* expert, int k, const uint8_t* dropped, int64_t n) {
  const int64_t nk = n * k;
  for (int64_t r = 0; r < nk; ++r) ++s->expert_counts[static_cast<size_t>(expert[r])];
  if (dropped != nullptr) {
    for (int64_t r = 0; r < n; ++r) s->dropped += dropped[r] != 0;
  }
  s->tokens += n;
}

json stats_fields(const Stats& t, const Layout& layout) {
  json j;
  const int64_t n_enc = static_cast<int64_t>(layout.enc_layers.size());
  j["num_samples"] = t.num_samples;
  j["num_tokens"] = t.num_tokens;
  j["num_decoder_tokens"] = t.num_decoder_tokens;
  j["total_traces"] = t.num_samples * n_enc;
  std::vector<int64_t> dist(static_cast<size_t>(layout.num_experts), 0);
  for (int b : layout.enc_layers) {
    auto it = t.layers.find(layer_key(layout, false, b));
    if (it == t.layers.end()) continue;
    for (size_t e = 0; e < dist.size() && e < it->second.expert_counts.size(); ++e) {
      dist[e] += it->second.expert_counts[e];
    }
  }
  json ed = json::object();
  int64_t used = 0;
  for (size_t e = 0; e < dist.size(); ++e) {
    ed[std::to_string(e)] = dist[e];
    used += dist[e] != 0;
  }
  j["expert_distribution"] = ed;
  j["experts_used"] = used;
  j["diversity_percentage"] =
      100.0 * static_cast<double>(used) / static_cast<double>(layout.num_experts);
  json dd = json::object();
  for (const auto& [name, n] : t.dataset_samples) dd[name] = n * n_enc;
  j["dataset_distribution"] = dd;
  json pl = json::object();
  auto put_layer = [&](bool dec, int b) {
    const std::string key = layer_key(layout, dec, b);
    LayerStats ls;
    ls.expert_counts.assign(static_cast<size_t>(layout.num_experts), 0);
    auto it = t.layers.find(key);
    if (it != t.layers.end()) ls = it->second;
    pl[key] = {
        {"expert_counts", ls.expert_counts},
        {"dropped", ls.dropped},
        {"tokens", ls.tokens},
        {"drop_rate",
         ls.tokens > 0 ? static_cast<double>(ls.dropped) / static_cast<double>(ls.tokens) : 0.0}};
  };
  for (int b : layout.enc_layers) put_layer(false, b);
  for (int b : layout.dec_layers) put_layer(true, b);
  j["per_layer"] = pl;
  return j;
}

json shard_entry_json(const ShardEntry& e) {
  return {{"file", e.file},
          {"first_sample", e.first_sample},
          {"num_samples", e.num_samples},
          {"num_tokens", e.num_tokens},
          {"num_decoder_tokens", e.num_decoder_tokens},
          {"bytes", e.bytes},
          {"sha256", e.sha256}};
}

ShardEntry shard_entry_from_json(const json& j, const std::string& what) {
  ShardEntry e;
  const json& file = field(j, "file", what);
  if (!file.is_string()) fail(what, ": field \"file\" must be a string");
  e.file = file.get<std::string>();
  int64_t index;
  std::string rank_dir;
  if (!parse_shard_path(e.file, &index, &rank_dir)) {
    fail(what, ": file \"", e.file,
         "\" is neither shard-NNNNN.safetensors nor "
         "ranks/rank-RRRRR-of-WWWWW/shard-NNNNN.safetensors");
  }
  e.first_sample = int_field(j, "first_sample", what, 0);
  e.num_samples = int_field(j, "num_samples", what, 0);
  e.num_tokens = int_field(j, "num_tokens", what, 0);
  e.num_decoder_tokens = int_field(j, "num_decoder_tokens", what, 0);
  e.bytes = int_field(j, "bytes", what, 8);
  const json& sha = field(j, "sha256", what);
  if (!sha.is_string() || sha.get<std::string>().size() != 64) {
    fail(what, ": field \"sha256\" must be 64 hex digits");
  }
  e.sha256 = sha.get<std::string>();
  return e;
}

json part_json(const Part& p) {
  return {{"rank", p.rank},
          {"world_size", p.world_size},
          {"first_sample", p.first_sample},
          {"num_samples", p.num_samples},
          {"total_samples", p.total_samples}};
}

Part part_from_json(const json& j, const std::string& what) {
  Part p;
  p.world_size = static_cast<int>(int_field(j, "world_size", what + ": part", 1, 1 << 20));
  p.rank = static_cast<int>(int_field(j, "rank", what + ": part", 0, 1 << 20));
  p.first_sample = int_field(j, "first_sample", what + ": part", 0);
  p.num_samples = int_field(j, "num_samples", what + ": part", 0);
  p.total_samples = int_field(j, "total_samples", what + ": part", 0);
  if (p.rank >= p.world_size || p.first_sample + p.num_samples > p.total_samples) {
    fail(what, ": part ", j.dump(), " is inconsistent (rank < world_size and ",
         "first_sample + num_samples <= total_samples expected)");
  }
  return p;
}

nlohmann::ordered_json build_manifest(const ManifestFields& f) {
  using ordered_json = nlohmann::ordered_json;
  const Layout& layout = f.layout;
  // ordered_json keeps the documented field order; the nested objects come from json.
  auto ord = [](const json& j) { return ordered_json::parse(j.dump()); };
  ordered_json m;
  m["format"] = kTraceFormat;
  m["format_version"] = layout.format_version();
  m["moetrace_version"] = MOETRACE_VERSION;
  m["complete"] = f.complete;
  m["command_line"] = f.command_line;
  m["settings"] = ord(f.settings.is_null() ? json::object() : f.settings);
  m["model"] = ord(f.model.is_null() ? json::object() : f.model);
  m["layers"] = {{"encoder", layout.enc_layers}, {"decoder", layout.dec_layers}};
  m["num_experts"] = layout.num_experts;
  m["d_model"] = layout.d_model;
  m["logits_dtype"] = std::string(dtype_name(layout.logits_dtype));
  m["hidden_dtype"] = hidden_dtype_name(layout.hidden_dtype);
  m["decoder"] = layout.decoder;
  if (layout.format_version() != kTraceFormatVersionSwitch)
    m["routing"] = ord(routing_json(layout));
  if (layout.logits_topk > 0) m["logits_topk"] = layout.logits_topk;
  m["samples_per_shard"] = layout.samples_per_shard;
  if (f.part) m["part"] = ord(part_json(*f.part));
  if (!f.data_parallel.is_null()) m["data_parallel"] = f.data_parallel;
  m["shards"] = ordered_json::array();
  for (const auto& e : f.shards) m["shards"].push_back(ord(shard_entry_json(e)));
  const json st = stats_fields(f.totals, layout);
  for (const char* k : {"num_samples", "num_tokens", "num_decoder_tokens", "total_traces"}) {
    m[k] = st[k];
  }
  ordered_json dist = ordered_json::object();  // "0".."E-1" in numeric order
  for (int64_t e = 0; e < layout.num_experts; ++e) {
    dist[std::to_string(e)] = st["expert_distribution"][std::to_string(e)];
  }
  m["expert_distribution"] = dist;
  m["experts_used"] = st["experts_used"];
  m["diversity_percentage"] = st["diversity_percentage"];
  m["dataset_distribution"] = ord(st["dataset_distribution"]);
  m["collection_time"] = f.collection_time;
  m["device"] = f.device;
  if (!f.engine.is_null()) m["engine"] = ord(f.engine);
  ordered_json pl = ordered_json::object();  // layers in block order, encoder first
  auto put = [&](bool dec, int b) {
    const std::string key = layer_key(layout, dec, b);
    const json& l = st["per_layer"][key];
    pl[key] = {{"expert_counts", l["expert_counts"]},
               {"dropped", l["dropped"]},
               {"tokens", l["tokens"]},
               {"drop_rate", l["drop_rate"]}};
  };
  for (int b : layout.enc_layers) put(false, b);
  for (int b : layout.dec_layers) put(true, b);
  m["per_layer"] = pl;
  m["throughput_tokens_per_s"] =
      f.collection_time > 0 ? static_cast<double>(f.totals.num_tokens) / f.collection_time : 0.0;
  if (f.fidelity) m["fidelity"] = fidelity_json(*f.fidelity);
  return m;
}

Stats stats_from_manifest(const json& m, const Layout& layout, const std::string& what) {
  Stats s = empty_stats(layout);
  s.num_samples = int_field(m, "num_samples", what, 0);
  s.num_tokens = int_field(m, "num_tokens", what, 0);
  s.num_decoder_tokens = int_field(m, "num_decoder_tokens", what, 0);
  const json& pl = field(m, "per_layer", what);
  for (auto& [key, ls] : s.layers) {
    const std::string lw = what + ": per_layer." + key;
    const json& l = field(pl, key.c_str(), what + ": per_layer");
    const json& counts = field(l, "expert_counts", lw);
    if (!counts.is_array() || counts.size() != ls.expert_counts.size()) {
      fail(lw, ": expert_counts must be an array of ", ls.expert_counts.size(), " counts");
    }
    for (size_t e = 0; e < counts.size(); ++e) {
      if (!counts[e].is_number_integer() || counts[e].get<int64_t>() < 0)
        fail(lw, ": expert_counts[", e, "] must be an integer >= 0");
      ls.expert_counts[e] = counts[e].get<int64_t>();
    }
    ls.dropped = int_field(l, "dropped", lw, 0);
    ls.tokens = int_field(l, "tokens", lw, 0);
  }
  // dataset_distribution counts traces = samples × encoder MoE layers.
  const int64_t n_enc = static_cast<int64_t>(layout.enc_layers.size());
  const json& dd = field(m, "dataset_distribution", what);
  if (!dd.is_object()) fail(what, ": dataset_distribution must be an object");
  for (auto it = dd.begin(); it != dd.end(); ++it) {
    if (!it.value().is_number_integer() || it.value().get<int64_t>() < 0 ||
        (n_enc > 0 && it.value().get<int64_t>() % n_enc != 0)) {
      fail(what, ": dataset_distribution.", it.key(), " must be a multiple of ", n_enc);
    }
    s.dataset_samples[it.key()] = n_enc > 0 ? it.value().get<int64_t>() / n_enc : 0;
  }
  return s;
}

namespace {

nlohmann::ordered_json fidelity_counts_json(const FidelityCounts& c) {
  return {{"tokens", c.tokens},
          {"top1_agree", c.top1_agree},
          {"top1_agreement", c.top1_agreement()},
          {"max_logit_error", c.max_logit_error}};
}

double number_field(const json& j, const char* key, const std::string& what, double min_value,
                    double max_value) {
  const json& v = field(j, key, what);
  if (!v.is_number() || !(v.get<double>() >= min_value && v.get<double>() <= max_value)) {
    fail(what, ": field \"", key, "\" must be a number in [", min_value, ", ", max_value, "], got ",
         v.dump());
  }
  return v.get<double>();
}

std::string string_field(const json& j, const char* key, const std::string& what) {
  const json& v = field(j, key, what);
  if (!v.is_string() || v.get<std::string>().size() > 1000)
    fail(what, ": field \"", key, "\" must be a string (of at most 1000 bytes)");
  return v.get<std::string>();
}

FidelityCounts fidelity_counts_from_json(const json& j, const std::string& what) {
  if (!j.is_object()) fail(what, ": must be an object");
  FidelityCounts c;
  c.tokens = int_field(j, "tokens", what, 0);
  c.top1_agree = int_field(j, "top1_agree", what, 0, c.tokens);
  c.max_logit_error = number_field(j, "max_logit_error", what, 0, kFidelityNonFinite);
  const double a = number_field(j, "top1_agreement", what, 0, 1);
  if (std::fabs(a - c.top1_agreement()) > 1e-9) {
    fail(what, ": top1_agreement ", a, " is not top1_agree / tokens = ", c.top1_agree, " / ",
         c.tokens);
  }
  return c;
}

}  // namespace

std::optional<Fidelity> merge_fidelity(const std::vector<std::optional<Fidelity>>& ranks) {
  if (ranks.empty() || !ranks[0]) return std::nullopt;
  Fidelity m = *ranks[0];
  for (size_t r = 1; r < ranks.size(); ++r) {
    if (!ranks[r]) return std::nullopt;
    const Fidelity& f = *ranks[r];
    if (f.measured != m.measured || f.reference != m.reference || f.precision != m.precision ||
        f.fraction != m.fraction || f.reason != m.reason ||
        f.per_layer.size() != m.per_layer.size())
      return std::nullopt;
    m.samples += f.samples;
    m.seconds = std::max(m.seconds, f.seconds);  // the ranks audit side by side
    for (size_t l = 0; l < f.per_layer.size(); ++l) {
      if (f.per_layer[l].first != m.per_layer[l].first) return std::nullopt;
      FidelityCounts& c = m.per_layer[l].second;
      c.tokens += f.per_layer[l].second.tokens;
      c.top1_agree += f.per_layer[l].second.top1_agree;
      c.max_logit_error = std::max(c.max_logit_error, f.per_layer[l].second.max_logit_error);
    }
    m.total.tokens += f.total.tokens;
    m.total.top1_agree += f.total.top1_agree;
    m.total.max_logit_error = std::max(m.total.max_logit_error, f.total.max_logit_error);
  }
  return m;
}

nlohmann::ordered_json fidelity_json(const Fidelity& f) {
  nlohmann::ordered_json j;
  j["status"] = f.measured ? "measured" : "skipped";
  if (!f.measured) j["reason"] = f.reason;
  j["reference"] = f.reference;
  j["precision"] = f.precision;
  j["fraction"] = f.fraction;
  if (!f.measured) return j;
  j["samples"] = f.samples;
  j["seconds"] = f.seconds;
  nlohmann::ordered_json pl = nlohmann::ordered_json::object();
  for (const auto& [key, c] : f.per_layer) pl[key] = fidelity_counts_json(c);
  j["per_layer"] = pl;
  j["total"] = fidelity_counts_json(f.total);
  return j;
}

Fidelity fidelity_from_json(const json& j, const Layout& layout, const std::string& w) {
  const std::string what = w + ": fidelity";
  if (!j.is_object()) fail(what, ": must be an object");
  Fidelity f;
  const std::string status = string_field(j, "status", what);
  if (status != "measured" && status != "skipped")
    fail(what, ": status must be \"measured\" or \"skipped\", got \"", status, "\"");
  f.measured = status == "measured";
  f.reference = string_field(j, "reference", what);
  f.precision = string_field(j, "precision", what);
  f.fraction = number_field(j, "fraction", what, 0, 1);
  if (!f.measured) {
    f.reason = string_field(j, "reason", what);
    return f;
  }
  f.samples = int_field(j, "samples", what, 0);
  f.seconds = number_field(j, "seconds", what, 0, 1e12);
  const json& pl = field(j, "per_layer", what);
  if (!pl.is_object()) fail(what, ": per_layer must be an object");
  if (pl.size() != layout.enc_layers.size()) {
    fail(what, ": per_layer must hold the ", layout.enc_layers.size(),
         " encoder MoE layers of the store, holds ", pl.size(), " entries");
  }
  FidelityCounts sum;
  for (int b : layout.enc_layers) {
    const std::string key = layer_key(layout, false, b);
    const FidelityCounts c = fidelity_counts_from_json(field(pl, key.c_str(), what + ": per_layer"),
                                                       what + ": per_layer." + key);
    sum.tokens += c.tokens;
    sum.top1_agree += c.top1_agree;
    sum.max_logit_error = std::max(sum.max_logit_error, c.max_logit_error);
    f.per_layer.emplace_back(key, c);
  }
  f.total = fidelity_counts_from_json(field(j, "total", what), what + ": total");
  if (f.total.tokens != sum.tokens || f.total.top1_agree != sum.top1_agree ||
      f.total.max_logit_error != sum.max_logit_error) {
    fail(what, ": total is not the sum of per_layer (tokens ", sum.tokens, ", top1_agree ",
         sum.top1_agree, ", the largest max_logit_error ", sum.max_logit_error, ")");
  }
  return f;
}

namespace {

// Parses a metadata value that holds a JSON array of n elements.
json meta_array(const SafetensorsFile& f, const char* key, size_t n) {
  const std::string what = f.path().string();
  auto it = f.metadata().find(key);
  if (it == f.metadata().end()) fail(what, ": __metadata__ lacks \"", key, "\"");
  json j;
  try {
    j = json::parse(it->second);
  } catch (const json::exception&) {
    fail(what, ": __metadata__ \"", key, "\" is not valid JSON");
  }
  if (!j.is_array() || j.size() != n) {
    fail(what, ": __metadata__ \"", key, "\" must be a JSON array of ", n, " entries");
  }
  return j;
}

const NamedView& expect_tensor(const SafetensorsFile& f, const std::string& name, DType dtype,
                               const Shape& shape, std::set<std::string>* seen) {
  const NamedView* t = f.find(name);
  if (t == nullptr) fail(f.path().string(), ": missing tensor ", name);
  if (t->view.dtype != dtype || t->view.shape != shape) {
    fail(f.path().string(), ": tensor ", name, " is ", dtype_name(t->view.dtype), " ",
         shape_str(t->view.shape), ", expected ", dtype_name(dtype), " ", shape_str(shape));
  }
  seen->insert(name);
  return *t;
}

// [n+1] offsets: 0 at the start, non-decreasing, ending at total.
void check_offsets(const SafetensorsFile& f, const std::string& name, const TensorView& v,
                   int64_t n, int64_t total) {
  const std::vector<int64_t> off = read_elems<int64_t>(v, 0, static_cast<size_t>(n) + 1);
  if (off[0] != 0) fail(f.path().string(), ": ", name, "[0] is ", off[0], ", expected 0");
  for (int64_t k = 0; k < n; ++k) {
    if (off[k + 1] < off[k]) {
      fail(f.path().string(), ": ", name, " decreases at sample ", k, " (", off[k], " > ",
           off[k + 1], ")");
    }
  }
  if (off[n] != total) {
    fail(f.path().string(), ": ", name, "[", n, "] is ", off[n], ", expected ", total);
  }
}

// Experts [rows, width] in [0, E), distinct within a row (a token's k choices, its top-K ids).
void check_expert_rows(const SafetensorsFile& f, const std::string& name, const int32_t* e,
                       int64_t rows, int64_t width, int64_t E) {
  std::vector<int32_t> row(static_cast<size_t>(width));
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j = 0; j < width; ++j) {
      const int32_t x = e[r * width + j];
      if (x < 0 || x >= E) {
        fail(f.path().string(), ": ", name, "[", r, width > 1 ? "][" + std::to_string(j) : "",
             "] = ", x, " is outside [0, ", E, ")");
      }
    }
    if (width == 1) continue;
    row.assign(e + r * width, e + (r + 1) * width);
    std::sort(row.begin(), row.end());
    const auto dup = std::adjacent_find(row.begin(), row.end());
    if (dup != row.end())
      fail(f.path().string(), ": ", name, "[", r, "] holds expert ", *dup, " twice");
  }
}

// --logits topk:K: values non-increasing along K, ids distinct experts, and the K probabilities
// exp(value - lse) summing to at most 1 (within the F16 rounding of the values).
void check_topk(const SafetensorsFile& f, const std::string& p, const TensorView& values,
                const TensorView& ids, const TensorView& lse, int64_t rows, int64_t K, int64_t E) {
  const std::vector<int32_t> id = read_elems<int32_t>(ids, 0, static_cast<size_t>(rows * K));
  check_expert_rows(f, p + "router_topk_ids", id.data(), rows, K, E);
  const std::vector<float> v =
      read_f32_rows(values, 0, static_cast<size_t>(rows), static_cast<size_t>(K));
  const std::vector<float> l = read_elems<float>(lse, 0, static_cast<size_t>(rows));
  for (int64_t r = 0; r < rows; ++r) {
    const float* x = v.data() + r * K;
    double sum = 0, max_abs = 0;
    bool finite = std::isfinite(l[r]);
    for (int64_t j = 0; j < K; ++j) {
      if (j > 0 && x[j] > x[j - 1]) {
        fail(f.path().string(), ": ", p, "router_topk_logits[", r, "] increases at ", j, " (",
             x[j - 1], " then ", x[j], "); the K largest come in descending order");
      }
      finite = finite && std::isfinite(x[j]);
      sum += std::exp(static_cast<double>(x[j]) - l[r]);
      max_abs = std::max(max_abs, std::fabs(static_cast<double>(x[j])));
    }
    // F16 rounds each value by at most 2^-11 of itself (plus subnormals), fp32 the lse by 2^-24.
    const double bound =
        std::exp(max_abs * 0x1p-11 + std::fabs(static_cast<double>(l[r])) * 0x1p-23 + 1e-6);
    if (finite && !(sum <= bound)) {
      fail(f.path().string(), ": ", p, "router_lse[", r, "] = ", l[r],
           " is below the log-sum-exp of the stored top-K logits (their probabilities sum to ", sum,
           ")");
    }
  }
}

// Checks and counts one MoE layer's tensors of rows rows.
void check_layer(const SafetensorsFile& f, const Layout& layout, bool dec, int block, int64_t rows,
                 std::set<std::string>* seen, LayerStats* stats) {
  const std::string p = layer_key(layout, dec, block) + ".";
  const int64_t E = layout.num_experts, k = layout.top_k;
  if (layout.logits_topk > 0) {
    const int64_t K = layout.logits_topk;
    const auto& v = expect_tensor(f, p + "router_topk_logits", DType::kF16, {rows, K}, seen);
    const auto& ids = expect_tensor(f, p + "router_topk_ids", DType::kI32, {rows, K}, seen);
    const auto& lse = expect_tensor(f, p + "router_lse", DType::kF32, {rows}, seen);
    check_topk(f, p, v.view, ids.view, lse.view, rows, K, E);
  } else {
    expect_tensor(f, p + "router_logits", layout.logits_dtype, {rows, E}, seen);
  }
  // [T] for top-1 (Switch, as in version 1), [T, k] above.
  const Shape per_choice = k == 1 ? Shape{rows} : Shape{rows, k};
  const auto& expert = expect_tensor(f, p + "expert", DType::kI32, per_choice, seen);
  expect_tensor(f, p + "gate", DType::kF32, per_choice, seen);
  std::vector<uint8_t> d;
  if (layout.dropped) {
    const auto& dropped = expect_tensor(f, p + "dropped", DType::kU8, {rows}, seen);
    d = read_elems<uint8_t>(dropped.view, 0, static_cast<size_t>(rows));
    for (int64_t r = 0; r < rows; ++r) {
      if (d[r] > 1)
        fail(f.path().string(), ": ", p, "dropped[", r, "] = ", int{d[r]}, " is not 0 or 1");
    }
  }
  if (layout.hidden_dtype) {
    expect_tensor(f, p + "hidden", *layout.hidden_dtype, {rows, layout.d_model}, seen);
  }
  const std::vector<int32_t> e = read_elems<int32_t>(expert.view, 0, static_cast<size_t>(rows * k));
  check_expert_rows(f, p + "expert", e.data(), rows, k, E);
  count_rows(stats, e.data(), static_cast<int>(k), layout.dropped ? d.data() : nullptr, rows);
}

}  // namespace

Stats check_shard(const SafetensorsFile& f, const Layout& layout, int64_t expected_first_sample,
                  ShardMeta* meta_out) {
  const std::string what = f.path().string();
  const auto& md = f.metadata();
  auto get = [&](const char* key) -> const std::string& {
    auto it = md.find(key);
    if (it == md.end()) fail(what, ": __metadata__ lacks \"", key, "\"");
    return it->second;
  };
  if (get("format") != kTraceFormat) fail(what, ": __metadata__ format is not ", kTraceFormat);
  if (get("format_version") != std::to_string(layout.format_version())) {
    fail(what, ": __metadata__ format_version is \"", get("format_version"), "\", expected \"",
         layout.format_version(), "\" (the manifest's)");
  }
  if (get("first_sample") != std::to_string(expected_first_sample)) {
    fail(what, ": __metadata__ first_sample is \"", get("first_sample"), "\", expected \"",
         expected_first_sample, "\"");
  }
  const NamedView* kind_t = f.find("sample_kind");
  const NamedView* tok_t = f.find("token_ids");
  if (kind_t == nullptr || kind_t->view.shape.size() != 1)
    fail(what, ": missing tensor sample_kind [N]");
  if (tok_t == nullptr || tok_t->view.shape.size() != 1)
    fail(what, ": missing tensor token_ids [T]");
  const int64_t n = kind_t->view.shape[0];
  const int64_t t = tok_t->view.shape[0];
  std::set<std::string> seen;
  expect_tensor(f, "token_ids", DType::kI32, {t}, &seen);
  const auto& offsets = expect_tensor(f, "sample_offsets", DType::kI64, {n + 1}, &seen);
  const auto& kind = expect_tensor(f, "sample_kind", DType::kU8, {n}, &seen);
  check_offsets(f, "sample_offsets", offsets.view, n, t);
  for (int64_t k = 0; k < n; ++k) {
    if (kind.view.as<uint8_t>()[k] > 1) fail(what, ": sample_kind[", k, "] is not 0 or 1");
  }

  ShardMeta meta;
  meta.first_sample = expected_first_sample;
  const json ids = meta_array(f, "sample_ids", static_cast<size_t>(n));
  const json datasets = meta_array(f, "datasets", static_cast<size_t>(n));
  const json rows = meta_array(f, "rows", static_cast<size_t>(n));
  for (int64_t k = 0; k < n; ++k) {
    const json& id = ids[static_cast<size_t>(k)];
    const json& ds = datasets[static_cast<size_t>(k)];
    const json& row = rows[static_cast<size_t>(k)];
    if (!id.is_string() || !ds.is_string() || !row.is_number_integer()) {
      fail(what, ": __metadata__ entry ", k, " of sample_ids/datasets/rows has the wrong type");
    }
    meta.sample_ids.push_back(id.get<std::string>());
    meta.datasets.push_back(ds.get<std::string>());
    meta.rows.push_back(row.get<int64_t>());
  }

  Stats s = empty_stats(layout);
  s.num_samples = n;
  s.num_tokens = t;
  for (const auto& d : meta.datasets) ++s.dataset_samples[d];
  for (int b : layout.enc_layers)
    check_layer(f, layout, false, b, t, &seen, &s.layers[layer_key(layout, false, b)]);
  if (layout.decoder) {
    const std::string in_name = gen_tensor(layout, "input_ids");
    const std::string off_name = gen_tensor(layout, "sample_offsets");
    const NamedView* in_t = f.find(in_name);
    if (in_t == nullptr || in_t->view.shape.size() != 1)
      fail(what, ": missing tensor ", in_name, " [G]");
    const int64_t g = in_t->view.shape[0];
    expect_tensor(f, in_name, DType::kI32, {g}, &seen);
    expect_tensor(f, gen_tensor(layout, "output_ids"), DType::kI32, {g}, &seen);
    const auto& dec_off = expect_tensor(f, off_name, DType::kI64, {n + 1}, &seen);
    check_offsets(f, off_name, dec_off.view, n, g);
    s.num_decoder_tokens = g;
    for (int b : layout.dec_layers)
      check_layer(f, layout, true, b, g, &seen, &s.layers[layer_key(layout, true, b)]);
  }
  for (const auto& nv : f.tensors()) {
    if (!seen.count(nv.name)) fail(what, ": unexpected tensor ", nv.name);
  }
  if (meta_out != nullptr) *meta_out = std::move(meta);
  return s;
}

std::vector<float> read_f32_rows(const TensorView& v, size_t row0, size_t rows, size_t width) {
  std::vector<float> out(rows * width);
  if (v.dtype == DType::kF32) {
    out = read_elems<float>(v, row0 * width, rows * width);
  } else {
    const std::vector<uint16_t> raw = read_elems<uint16_t>(v, row0 * width, rows * width);
    convert_to_f32(v.dtype, raw.data(), out.data(), raw.size());
  }
  return out;
}

void fsync_file(const fs::path& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) fail(path.string(), ": cannot open for fsync: ", std::strerror(errno));
  const int rc = ::fsync(fd);
  const int err = errno;
  ::close(fd);
  if (rc != 0) fail(path.string(), ": fsync failed: ", std::strerror(err));
}

void fsync_dir(const fs::path& dir) {
  const int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) fail(dir.string(), ": cannot open directory for fsync: ", std::strerror(errno));
  const int rc = ::fsync(fd);
  const int err = errno;
  ::close(fd);
  if (rc != 0) fail(dir.string(), ": fsync of the directory failed: ", std::strerror(err));
}

void atomic_write_file(const fs::path& dir, const std::string& name, const std::string& bytes,
                       const std::string& tmp_suffix) {
  const fs::path tmp = dir / (kTmpPrefix + name + tmp_suffix);
  const fs::path dst = dir / name;
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) fail(tmp.string(), ": cannot create: ", std::strerror(errno));
  size_t done = 0;
  int err = 0;
  while (done < bytes.size()) {
    const ssize_t w = ::write(fd, bytes.data() + done, bytes.size() - done);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) {
      err = w < 0 ? errno : EIO;
      break;
    }
    done += static_cast<size_t>(w);
  }
  if (err == 0 && ::fsync(fd) != 0) err = errno;
  if (::close(fd) != 0 && err == 0) err = errno;
  if (err != 0) {
    std::error_code ec;
    fs::remove(tmp, ec);
    fail(tmp.string(), ": write failed: ", std::strerror(err));
  }
  if (::rename(tmp.c_str(), dst.c_str()) != 0) {
    err = errno;
    std::error_code ec;
    fs::remove(tmp, ec);
    fail(dst.string(), ": cannot rename ", tmp.filename().string(),
         " into place: ", std::strerror(err));
  }
  fsync_dir(dir);
}

json read_manifest(const fs::path& dir) {
  const fs::path p = dir / kManifestName;
  std::ifstream in(p, std::ios::binary);
  if (!in) fail(p.string(), ": cannot open (not a trace store?)");
  std::ostringstream ss;
  ss << in.rdbuf();
  json m;
  try {
    m = json::parse(ss.str());
  } catch (const json::exception& e) {
    fail(p.string(), ": not valid JSON (", e.what(), ")");
  }
  if (!m.is_object() || !m.contains("format") || m["format"] != kTraceFormat) {
    fail(p.string(), ": \"format\" is not \"", kTraceFormat, "\"");
  }
  if (!m.contains("format_version") || !m["format_version"].is_number_integer()) {
    fail(p.string(), ": missing integer \"format_version\"");
  }
  const int64_t v = m["format_version"].get<int64_t>();
  if (v != kTraceFormatVersionSwitch && v != kTraceFormatVersion) {
    fail(p.string(), ": format_version ", m["format_version"].dump(),
         " is not supported (this moetrace reads versions ", kTraceFormatVersionSwitch, " and ",
         kTraceFormatVersion, ")");
  }
  return m;
}

}  // namespace moetrace::trace

namespace moetrace {

bool is_routing_family(std::string_view family) {
  for (std::string_view f : kRoutingFamilies) {
    if (f == family) return true;
  }
  return false;
}

namespace {

// A float as an int32 whose order is the float's, with NaN below every number (-inf included).
inline int32_t order_key(float f) {
  int32_t i;
  std::memcpy(&i, &f, sizeof(i));
  if (std::isnan(f)) return INT32_MIN;
  if (f == 0.f) return 0;               // -0 == +0: ties, as the floats compare
  return i >= 0 ? i : (i ^ INT32_MAX);  // negative floats: larger magnitude, smaller key
}

}  // namespace

void router_topk(const float* logits, int64_t rows, int64_t E, int K, float* values, int32_t* ids,
                 float* lse) {
  MT_ASSERT(K >= 1 && K <= E);
  // A capture of 1.5M tokens/s of 6 MoE layers asks for ~10M rows/s, so the common small K keeps
  // the K best seen so far in registers-sized arrays and inserts without data-dependent branches
  // (about 2x faster than a sort of all E); large K sorts.
  constexpr int kSmallK = 32;
  std::vector<int32_t> order(K > kSmallK ? static_cast<size_t>(E) : 0);
  for (int64_t r = 0; r < rows; ++r) {
    const float* x = logits + r * E;
    int32_t* id = ids + r * K;
    if (K <= kSmallK) {
      // (key, index) pairs in order; an empty slot (INT32_MIN, INT32_MAX) is after every entry, a
      // NaN's (INT32_MIN, e) before the empty slots. Entries come in index order, so an equal key
      // never goes before a held one: ties stay with the lowest index.
      int32_t kv[kSmallK], ix[kSmallK];
      for (int j = 0; j < K; ++j) {
        kv[j] = INT32_MIN;
        ix[j] = INT32_MAX;
      }
      for (int32_t e = 0; e < static_cast<int32_t>(E); ++e) {
        const int32_t k = order_key(x[e]);
        auto before = [&](int j) { return k > kv[j] || (k == kv[j] && ix[j] == INT32_MAX); };
        if (!before(K - 1)) continue;
        for (int j = K - 1; j > 0; --j) {
          const bool prev = before(j - 1), self = before(j);
          const int32_t nk = prev ? kv[j - 1] : self ? k : kv[j];
          const int32_t ni = prev ? ix[j - 1] : self ? e : ix[j];
          kv[j] = nk;
          ix[j] = ni;
        }
        if (before(0)) {
          kv[0] = k;
          ix[0] = e;
        }
      }
      std::copy(ix, ix + K, id);
    } else {
      std::iota(order.begin(), order.end(), 0);
      std::partial_sort(order.begin(), order.begin() + K, order.end(), [&](int32_t a, int32_t b) {
        const int32_t ka = order_key(x[a]), kb = order_key(x[b]);
        return ka != kb ? ka > kb : a < b;
      });
      std::copy(order.begin(), order.begin() + K, id);
    }
    float* v = values + r * K;
    for (int j = 0; j < K; ++j) v[j] = x[id[j]];
    // log(sum exp) around the largest value (every term <= 1: no overflow), summed in double.
    const float top = v[0];
    double sum = 0;
    for (int64_t e = 0; e < E; ++e) sum += static_cast<double>(std::exp(x[e] - top));
    lse[r] =
        std::isfinite(top) ? static_cast<float>(static_cast<double>(top) + std::log(sum)) : top;
  }
}

double FidelityCounts::top1_agreement() const {
  return tokens > 0 ? static_cast<double>(top1_agree) / static_cast<double>(tokens) : 1.0;
}

std::optional<Fidelity> manifest_fidelity(const nlohmann::json& m, const std::string& what) {
  if (!m.is_object() || !m.contains("fidelity")) return std::nullopt;
  return trace::fidelity_from_json(m["fidelity"], trace::layout_from_manifest(m, what), what);
}

}  // namespace moetrace
