// verify_store(): every claim of the manifest checked against the shards; print_store_summary().
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <functional>
#include <iomanip>
#include <optional>
#include <set>
#include <sstream>
#include <unordered_set>

#include "core/error.h"
#include "core/sha256.h"
#include "io/safetensors.h"
#include "trace/schema.h"
#include "trace/store.h"

namespace moetrace {

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

// Equality of JSON values where numbers compare by value (integers against floats, and floats
// within a relative 1e-9: the manifest's rates are doubles).
bool same_value(const json& a, const json& b) {
  if (a.is_number() && b.is_number()) {
    if (a.is_number_integer() && b.is_number_integer()) return a.get<int64_t>() == b.get<int64_t>();
    const double x = a.get<double>(), y = b.get<double>();
    return std::fabs(x - y) <= 1e-9 * std::max(1.0, std::max(std::fabs(x), std::fabs(y)));
  }
  if (a.is_object() && b.is_object()) {
    if (a.size() != b.size()) return false;
    for (auto it = a.begin(); it != a.end(); ++it) {
      if (!b.contains(it.key()) || !same_value(it.value(), b[it.key()])) return false;
    }
    return true;
  }
  if (a.is_array() && b.is_array()) {
    if (a.size() != b.size()) return false;
    for (size_t i = 0; i < a.size(); ++i) {
      if (!same_value(a[i], b[i])) return false;
    }
    return true;
  }
  return a == b;
}

std::string short_dump(const json& j) {
  std::string s = j.dump();
  return s.size() > 120 ? s.substr(0, 117) + "..." : s;
}

// The leaves where the manifest's value `got` and the recomputed `want` differ, as
// "path is X but the shards give Y" (a key on one side only says so).
void diff_values(const json& got, const json& want, const std::string& path,
                 std::vector<std::string>* out) {
  if (same_value(got, want)) return;
  if (got.is_object() && want.is_object()) {
    std::set<std::string> keys;
    for (auto it = got.begin(); it != got.end(); ++it) keys.insert(it.key());
    for (auto it = want.begin(); it != want.end(); ++it) keys.insert(it.key());
    for (const auto& k : keys) {
      const std::string sub = path + "." + k;
      if (!got.contains(k)) {
        out->push_back(sub + " is missing but the shards give " + short_dump(want[k]));
      } else if (!want.contains(k)) {
        out->push_back(sub + " is " + short_dump(got[k]) + " but the shards have no such entry");
      } else {
        diff_values(got[k], want[k], sub, out);
      }
    }
    return;
  }
  if (got.is_array() && want.is_array() && got.size() == want.size()) {
    for (size_t i = 0; i < got.size(); ++i)
      diff_values(got[i], want[i], path + "[" + std::to_string(i) + "]", out);
    return;
  }
  out->push_back(path + " is " + short_dump(got) + " but the shards give " + short_dump(want));
}

}  // namespace

std::vector<std::string> verify_store(const fs::path& dir, const VerifyProgress& progress) {
  std::vector<std::string> problems;
  const std::string what = (dir / trace::kManifestName).string();
  json m;
  trace::Layout layout;
  try {
    m = trace::read_manifest(dir);
    layout = trace::layout_from_manifest(m, what);
  } catch (const Error& e) {
    return {e.what()};
  }
  auto problem = [&](auto&&... parts) {
    std::ostringstream os;
    (os << ... << parts);
    problems.push_back(os.str());
  };

  // Field types of the parts not derived from the shards.
  auto expect = [&](const char* key, bool ok, const char* type) {
    if (!ok) problem(what, ": field \"", key, "\" is missing or not ", type);
  };
  auto has = [&](const char* key) { return m.contains(key); };
  expect("moetrace_version", has("moetrace_version") && m["moetrace_version"].is_string(),
         "a string");
  expect("complete", has("complete") && m["complete"].is_boolean(), "true/false");
  bool cl_ok = has("command_line") && m["command_line"].is_array();
  if (cl_ok) {
    for (const json& a : m["command_line"]) cl_ok = cl_ok && a.is_string();
  }
  expect("command_line", cl_ok, "an array of strings");
  expect("settings", has("settings") && m["settings"].is_object(), "an object");
  expect("model", has("model") && m["model"].is_object(), "an object");
  expect("device", has("device") && m["device"].is_string(), "a string");
  const bool time_ok = has("collection_time") && m["collection_time"].is_number() &&
                       m["collection_time"].get<double>() >= 0;
  expect("collection_time", time_ok, "a number >= 0");
  expect("throughput_tokens_per_s",
         has("throughput_tokens_per_s") && m["throughput_tokens_per_s"].is_number() &&
             m["throughput_tokens_per_s"].get<double>() >= 0,
         "a number >= 0");
  // The audit's fidelity object (collect --audit): well-formed, and about no more than the store.
  try {
    if (const std::optional<Fidelity> f = manifest_fidelity(m, what); f && f->measured) {
      const int64_t samples =
          m.value("num_samples", json(0)).is_number_integer() ? m["num_samples"].get<int64_t>() : 0;
      if (f->samples > samples) {
        problem(what, ": fidelity.samples is ", f->samples, ", more than the store's ", samples,
                " samples");
      }
    }
  } catch (const Error& e) {
    problems.push_back(e.what());
  }
  if (!has("shards") || !m["shards"].is_array()) {
    problem(what, ": field \"shards\" is missing or not an array");
    return problems;
  }

  // Where shard k must be: shard-{k}.safetensors in a single-process store; in one rank's store
  // (a "part") the global shard numbers start at its first sample; in a merged data-parallel store
  // ranks/<the rank holding the shard's samples>/shard-{k}.safetensors.
  std::optional<trace::Part> part;
  struct RankRange {
    int64_t first = 0, end = 0;
    std::string dir;
  };
  std::vector<RankRange> ranks;
  try {
    if (m.contains("part")) part = trace::part_from_json(m["part"], what);
    if (m.contains("data_parallel")) {
      const json& dp = m["data_parallel"];
      if (!dp.is_object() || !dp.contains("world_size") || !dp["world_size"].is_number_integer() ||
          !dp.contains("ranks") || !dp["ranks"].is_array()) {
        fail(what, ": data_parallel must hold world_size and ranks");
      }
      const int w = dp["world_size"].get<int>();
      if (w < 2 || dp["ranks"].size() != static_cast<size_t>(w))
        fail(what, ": data_parallel.ranks must list world_size (>= 2) ranks");
      int64_t first = 0;
      for (size_t r = 0; r < dp["ranks"].size(); ++r) {
        const json& e = dp["ranks"][r];
        const std::string want_dir =
            std::string(trace::kRanksDir) + "/" + trace::rank_dir_name(static_cast<int>(r), w);
        // Typed reads: json::value() throws a json type_error on a field of another type.
        auto int_at = [&](const char* key) -> int64_t {
          return e.contains(key) && e[key].is_number_integer() ? e[key].get<int64_t>() : -1;
        };
        if (!e.is_object() || int_at("rank") != static_cast<int64_t>(r) || !e.contains("dir") ||
            e["dir"] != want_dir || int_at("first_sample") != first || int_at("num_samples") < 0 ||
            int_at("num_samples") > (int64_t{1} << 50)) {
          fail(what, ": data_parallel.ranks[", r, "] must be rank ", r, " in ", want_dir,
               " starting at sample ", first);
        }
        ranks.push_back({first, first + e["num_samples"].get<int64_t>(), want_dir});
        first = ranks.back().end;
      }
    }
  } catch (const Error& e) {
    problems.push_back(e.what());
    return problems;
  }
  const int64_t base = part ? part->first_sample : 0;
  const int64_t first_shard = base / layout.samples_per_shard;
  auto expected_file = [&](int64_t k, int64_t first_sample) {
    const std::string name = trace::shard_file_name(first_shard + k);
    for (const auto& r : ranks) {
      if (first_sample >= r.first && first_sample < r.end) return r.dir + "/" + name;
    }
    return ranks.empty()
               ? name
               : "ranks/<no rank holds sample " + std::to_string(first_sample) + ">/" + name;
  };

  // Bytes the manifest lists, for progress (malformed entries count 0 here and fail below).
  int64_t bytes_total = 0, bytes_done = 0;
  for (const json& sh : m["shards"]) {
    if (sh.is_object() && sh.contains("bytes") && sh["bytes"].is_number_integer())
      bytes_total += std::max<int64_t>(0, sh["bytes"].get<int64_t>());
  }
  auto report = [&](size_t k) {
    const json& sh = m["shards"][k];
    if (sh.is_object() && sh.contains("bytes") && sh["bytes"].is_number_integer())
      bytes_done += std::max<int64_t>(0, sh["bytes"].get<int64_t>());
    if (progress) {
      progress(static_cast<int64_t>(k) + 1, static_cast<int64_t>(m["shards"].size()),
               std::min(bytes_done, bytes_total), bytes_total);
    }
  };

  trace::Stats totals = trace::empty_stats(layout);
  bool counts_complete = true;  // every shard was read, so the totals can be compared
  std::unordered_set<std::string> ids;
  int64_t next = base;
  const size_t n_shards = m["shards"].size();
  for (size_t k = 0; k < n_shards; ++k) {
    // Reported however the shard's check ends (the `continue`s below included).
    struct AfterShard {
      std::function<void()> f;
      ~AfterShard() { f(); }
    } after{[&report, k] { report(k); }};
    const std::string ew = what + ": shards[" + std::to_string(k) + "]";
    trace::ShardEntry e;
    try {
      e = trace::shard_entry_from_json(m["shards"][k], ew);
    } catch (const Error& err) {
      problems.push_back(err.what());
      counts_complete = false;
      continue;
    }
    const std::string want = expected_file(static_cast<int64_t>(k), next);
    if (e.file != want) problem(ew, ": file is ", e.file, ", expected ", want);
    if (e.first_sample != next)
      problem(ew, ": first_sample is ", e.first_sample, ", expected ", next);
    // Only checkable when the writer declared its shard size (numpy-made stores may not).
    if (m.contains("samples_per_shard") && k + 1 < n_shards &&
        e.num_samples != layout.samples_per_shard) {
      problem(ew, ": holds ", e.num_samples, " samples; only the last shard may hold other than ",
              layout.samples_per_shard);
    }
    next = e.first_sample + e.num_samples;
    const fs::path p = dir / e.file;
    std::error_code ec;
    const auto size = fs::file_size(p, ec);
    if (ec) {
      problem(p.string(), ": missing (", ec.message(), ")");
      counts_complete = false;
      continue;
    }
    if (static_cast<int64_t>(size) != e.bytes) {
      problem(p.string(), ": has ", size, " bytes, the manifest says ", e.bytes);
    }
    try {
      const std::string sha = sha256_file(p);
      if (sha != e.sha256)
        problem(p.string(), ": sha256 is ", sha, ", the manifest says ", e.sha256);
      const SafetensorsFile f = SafetensorsFile::open(p);
      trace::ShardMeta meta;
      const trace::Stats st = trace::check_shard(f, layout, e.first_sample, &meta);
      if (st.num_samples != e.num_samples) {
        problem(p.string(), ": holds ", st.num_samples, " samples, the manifest says ",
                e.num_samples);
      }
      if (st.num_tokens != e.num_tokens) {
        problem(p.string(), ": holds ", st.num_tokens, " tokens, the manifest says ", e.num_tokens);
      }
      if (st.num_decoder_tokens != e.num_decoder_tokens) {
        problem(p.string(), ": holds ", st.num_decoder_tokens,
                " decoder tokens, the manifest says ", e.num_decoder_tokens);
      }
      for (const auto& id : meta.sample_ids) {
        if (!ids.insert(id).second)
          problem(p.string(), ": sample id ", id, " appears twice in the store");
      }
      totals.add(st);
    } catch (const Error& err) {
      problems.push_back(err.what());
      counts_complete = false;
    }
  }

  if (!ranks.empty() && next != ranks.back().end) {
    problem(what, ": the shards hold samples [0, ", next, "), data_parallel.ranks [0, ",
            ranks.back().end, ")");
  }
  if (part && m.value("complete", false) == true &&
      next != part->first_sample + part->num_samples) {
    problem(what, ": complete, but its shards end at sample ", next, ", its part at ",
            part->first_sample + part->num_samples);
  }

  // The manifest's counts, recomputed from the shards.
  if (counts_complete) {
    const json want = trace::stats_fields(totals, layout);
    for (auto it = want.begin(); it != want.end(); ++it) {
      if (!m.contains(it.key())) {
        problem(what, ": field \"", it.key(), "\" is missing");
      } else if (!same_value(m[it.key()], it.value())) {
        // One line per field, naming the entries that differ (the first few of them).
        std::vector<std::string> diffs;
        diff_values(m[it.key()], it.value(), it.key(), &diffs);
        std::string line;
        constexpr size_t kShown = 4;
        for (size_t i = 0; i < diffs.size() && i < kShown; ++i)
          line += (i == 0 ? "" : "; ") + diffs[i];
        if (diffs.size() > kShown)
          line += "; and " + std::to_string(diffs.size() - kShown) + " more";
        problem(what, ": ", line);
      }
    }
  } else {
    problem(what,
            ": counts (num_samples, expert_distribution, per_layer, ...) not checked: "
            "some shards could not be read");
  }
  return problems;
}

namespace {

// Typed reads of optional manifest fields for the summary: absent (or null) gives the fallback
// (stores of other writers may leave counts out), present with another type is an Error naming the
// field.
class FieldReader {
 public:
  explicit FieldReader(std::string what) : what_(std::move(what)) {}

  bool absent(const json& obj, const std::string& key) const {
    return !obj.is_object() || !obj.contains(key) || obj[key].is_null();
  }
  int64_t integer(const json& obj, const std::string& key, const std::string& path,
                  int64_t fallback = 0) const {
    if (absent(obj, key)) return fallback;
    const json& v = obj[key];
    if (v.is_number_integer()) return v.get<int64_t>();
    if (v.is_number_float() && std::isfinite(v.get<double>()) &&
        v.get<double>() == std::floor(v.get<double>()) && std::fabs(v.get<double>()) < 9e15) {
      return static_cast<int64_t>(v.get<double>());
    }
    wrong(path, "an integer", v);
  }
  double number(const json& obj, const std::string& key, const std::string& path) const {
    if (absent(obj, key)) return 0.0;
    const json& v = obj[key];
    if (!v.is_number()) wrong(path, "a number", v);
    return v.get<double>();
  }
  std::string string(const json& obj, const std::string& key, const std::string& path) const {
    if (absent(obj, key)) return "?";
    const json& v = obj[key];
    if (!v.is_string()) wrong(path, "a string", v);
    return v.get<std::string>();
  }
  bool boolean(const json& obj, const std::string& key, const std::string& path) const {
    if (absent(obj, key)) return false;
    const json& v = obj[key];
    if (!v.is_boolean()) wrong(path, "true or false", v);
    return v.get<bool>();
  }
  const json& object(const json& obj, const std::string& key, const std::string& path) const {
    static const json kEmpty = json::object();
    if (absent(obj, key)) return kEmpty;
    const json& v = obj[key];
    if (!v.is_object()) wrong(path, "an object", v);
    return v;
  }

 private:
  [[noreturn]] void wrong(const std::string& path, const char* type, const json& v) const {
    fail(what_, ": field \"", path, "\" must be ", type, ", got ", short_dump(v));
  }
  std::string what_;
};

}  // namespace

json store_summary_json(const fs::path& dir) {
  const std::string what = (dir / trace::kManifestName).string();
  const json m = trace::read_manifest(dir);
  const trace::Layout layout = trace::layout_from_manifest(m, what);
  const FieldReader f(what);
  json out;
  out["kind"] = "trace_store";
  out["path"] = dir.string();
  out["complete"] = f.boolean(m, "complete", "complete");
  out["format"] = kTraceFormat;
  out["format_version"] = layout.format_version();
  out["moetrace_version"] = f.string(m, "moetrace_version", "moetrace_version");
  out["model"] = f.string(f.object(m, "model", "model"), "id", "model.id");
  for (const char* key : {"num_samples", "total_traces", "num_tokens", "num_decoder_tokens"})
    out[key] = f.integer(m, key, key);
  int64_t bytes = 0, num_shards = 0;
  if (!f.absent(m, "shards")) {
    if (!m["shards"].is_array()) fail(what, ": field \"shards\" must be an array");
    for (size_t k = 0; k < m["shards"].size(); ++k) {
      bytes +=
          trace::shard_entry_from_json(m["shards"][k], what + ": shards[" + std::to_string(k) + "]")
              .bytes;
      ++num_shards;
    }
  }
  out["num_shards"] = num_shards;
  out["bytes"] = bytes;
  out["samples_per_shard"] = layout.samples_per_shard;
  out["layers"] = {{"encoder", layout.enc_layers}, {"decoder", layout.dec_layers}};
  out["num_experts"] = layout.num_experts;
  out["d_model"] = layout.d_model;
  out["logits_dtype"] = std::string(dtype_name(layout.logits_dtype));
  out["hidden_dtype"] = trace::hidden_dtype_name(layout.hidden_dtype);
  out["decoder"] = layout.decoder;
  out["device"] = f.string(m, "device", "device");
  out["collection_time"] = f.number(m, "collection_time", "collection_time");
  out["throughput_tokens_per_s"] =
      f.number(m, "throughput_tokens_per_s", "throughput_tokens_per_s");

  json datasets = json::object();
  const json& dd = f.object(m, "dataset_distribution", "dataset_distribution");
  for (auto it = dd.begin(); it != dd.end(); ++it)
    datasets[it.key()] = f.integer(dd, it.key(), "dataset_distribution." + it.key());
  out["dataset_distribution"] = datasets;
  json experts = json::object();
  const json& ed = f.object(m, "expert_distribution", "expert_distribution");
  for (int64_t e = 0; e < layout.num_experts; ++e) {
    const std::string key = std::to_string(e);
    experts[key] = f.integer(ed, key, "expert_distribution." + key);
  }
  out["expert_distribution"] = experts;
  out["experts_used"] = f.integer(m, "experts_used", "experts_used");
  out["diversity_percentage"] = f.number(m, "diversity_percentage", "diversity_percentage");
  json per_layer = json::object();
  const json& pl = f.object(m, "per_layer", "per_layer");
  auto layer = [&](bool dec, int b) {
    const std::string key = trace::layer_key(layout, dec, b);
    if (f.absent(pl, key)) return;
    const json& l = f.object(pl, key, "per_layer." + key);
    per_layer[key] = {{"tokens", f.integer(l, "tokens", "per_layer." + key + ".tokens")},
                      {"dropped", f.integer(l, "dropped", "per_layer." + key + ".dropped")},
                      {"drop_rate", f.number(l, "drop_rate", "per_layer." + key + ".drop_rate")}};
  };
  for (int b : layout.enc_layers) layer(false, b);
  for (int b : layout.dec_layers) layer(true, b);
  out["per_layer"] = per_layer;
  // Version 2 (the defaults for a version-1 store): the routing and the --logits topk:K (0: full).
  out["routing"] = trace::routing_json(layout);
  out["logits_topk"] = layout.logits_topk;
  if (!f.absent(m, "part")) {
    const trace::Part p = trace::part_from_json(m["part"], what);
    out["part"] = {{"rank", p.rank},
                   {"world_size", p.world_size},
                   {"first_sample", p.first_sample},
                   {"num_samples", p.num_samples},
                   {"total_samples", p.total_samples}};
  }
  if (!f.absent(m, "data_parallel")) {
    const json& dp = f.object(m, "data_parallel", "data_parallel");
    if (!dp.contains("ranks") || !dp["ranks"].is_array())
      fail(what, ": field \"data_parallel.ranks\" must be an array");
    out["data_parallel_ranks"] = dp["ranks"].size();
  }
  // null when the store was not audited (collect --audit 0, or written before the audit existed).
  const std::optional<Fidelity> fid = manifest_fidelity(m, what);
  out["fidelity"] = fid ? json::parse(trace::fidelity_json(*fid).dump()) : json();
  return out;
}

namespace {

// A MoE layer's name from a summary (its routing family gives the stacks' prefixes).
std::string summary_layer_key(const json& summary, bool dec, int block) {
  trace::Layout l;
  l.family = summary["routing"]["family"].get<std::string>();
  return trace::layer_key(l, dec, block);
}

// "fidelity" lines of the summary: the audit's totals, then one line per encoder MoE layer
// (python/moetrace/__main__.py print_summary prints the same lines).
void print_fidelity(const json& summary, std::ostream& out) {
  const json& f = summary["fidelity"];
  if (f.is_null()) {
    out << "fidelity        not audited (`collect --audit FRACTION` re-runs samples at fp32)\n";
    return;
  }
  const std::string precision = f["precision"].get<std::string>();
  const std::string reference = f["reference"].get<std::string>();
  if (f["status"] != "measured") {
    out << "fidelity        " << precision << ": audit skipped (" << f["reason"].get<std::string>()
        << ")\n";
    return;
  }
  const std::ios_base::fmtflags flags = out.flags();
  const std::streamsize prec = out.precision();
  auto pct = [](const json& c) { return 100.0 * c["top1_agreement"].get<double>(); };
  const json& t = f["total"];
  out << std::fixed << "fidelity        " << precision << " vs an " << reference << " re-run of "
      << f["samples"] << " samples (" << t["tokens"] << " tokens, --audit " << std::defaultfloat
      << std::setprecision(6) << f["fraction"].get<double>() << std::fixed << "): top-1 agreement "
      << std::setprecision(3) << pct(t) << "%, max |logit error| " << std::setprecision(4)
      << t["max_logit_error"].get<double>() << "\n";
  out << "  " << std::left << std::setw(14) << "layer" << std::right << std::setw(12) << "tokens"
      << std::setw(12) << "top-1 agree" << std::setw(18) << "max |logit err|"
      << "\n";
  for (const json& b : summary["layers"]["encoder"]) {  // block order
    const std::string key = summary_layer_key(summary, false, b.get<int>());
    const json& c = f["per_layer"][key];
    out << "  " << std::left << std::setw(14) << key << std::right << std::setw(12)
        << c["tokens"].get<int64_t>() << std::setw(11) << std::setprecision(3) << pct(c) << "%"
        << std::setw(18) << std::setprecision(4) << c["max_logit_error"].get<double>() << "\n";
  }
  out.flags(flags);
  out.precision(prec);
}

}  // namespace

void print_store_summary(const fs::path& dir, std::ostream& out) {
  const json s = store_summary_json(dir);
  auto layers_str = [](const json& v) { return v.empty() ? std::string("none") : v.dump(); };
  const int64_t num_experts = s["num_experts"].get<int64_t>();

  out << "trace store     " << dir.string() << "\n";
  out << "status          "
      << (s["complete"].get<bool>()
              ? "complete"
              : "INCOMPLETE (interrupted or running; `moetrace collect --resume` continues it)")
      << "\n";
  out << "format          " << kTraceFormat << " v" << s["format_version"].get<int>()
      << ", written by moetrace " << s["moetrace_version"].get<std::string>() << "\n";
  const json& routing = s["routing"];
  out << "routing         " << routing["family"].get<std::string>() << ", top-"
      << routing["top_k"].get<int>() << (routing["dropped"].get<bool>() ? ", with" : ", no")
      << " expert capacity\n";
  out << "model           " << s["model"].get<std::string>() << "\n";
  out << "samples         " << s["num_samples"] << " (" << s["total_traces"] << " traces)\n";
  out << "tokens          " << s["num_tokens"] << " encoder";
  if (s["decoder"].get<bool>()) out << ", " << s["num_decoder_tokens"] << " decoder";
  out << "\n";
  out << "shards          " << s["num_shards"] << " (" << s["bytes"] << " bytes, "
      << s["samples_per_shard"] << " samples per shard)\n";
  if (s.contains("data_parallel_ranks")) {
    out << "data-parallel   " << s["data_parallel_ranks"] << " ranks, merged from "
        << trace::kRanksDir << "/\n";
  }
  if (s.contains("part")) {
    const json& p = s["part"];
    out << "part            rank " << p["rank"] << " of " << p["world_size"] << ": samples ["
        << p["first_sample"] << ", "
        << p["first_sample"].get<int64_t>() + p["num_samples"].get<int64_t>() << ") of "
        << p["total_samples"] << " (`moetrace merge` assembles the store)\n";
  }
  out << "MoE layers      encoder " << layers_str(s["layers"]["encoder"]) << ", decoder "
      << layers_str(s["layers"]["decoder"]) << "\n";
  out << "experts         " << num_experts << ", d_model " << s["d_model"] << "\n";
  if (s["logits_topk"].get<int>() > 0) {
    out << "stored          logits top-" << s["logits_topk"].get<int>()
        << " (F16 values, I32 ids, F32 log-sum-exp), hidden "
        << s["hidden_dtype"].get<std::string>() << "\n";
  } else {
    out << "stored          logits " << s["logits_dtype"].get<std::string>() << ", hidden "
        << s["hidden_dtype"].get<std::string>() << "\n";
  }
  out << "device          " << s["device"].get<std::string>() << "\n";
  out << std::fixed << std::setprecision(1);
  out << "collection      " << s["collection_time"].get<double>() << " s, "
      << s["throughput_tokens_per_s"].get<double>() << " tokens/s\n";

  const json& dd = s["dataset_distribution"];
  if (!dd.empty()) {
    out << "datasets (traces)\n";
    for (auto it = dd.begin(); it != dd.end(); ++it) {
      out << "  " << std::left << std::setw(32) << it.key() << std::right << " "
          << it.value().dump() << "\n";
    }
  }

  std::vector<std::pair<int64_t, int64_t>> counts;  // (count, expert)
  int64_t total = 0;
  for (int64_t e = 0; e < num_experts; ++e) {
    const int64_t c = s["expert_distribution"][std::to_string(e)].get<int64_t>();
    counts.push_back({c, e});
    total += c;
  }
  out << "experts used    " << s["experts_used"] << " of " << num_experts << " ("
      << s["diversity_percentage"].get<double>() << "%), "
      << (routing["top_k"].get<int>() == 1
              ? std::string("top-1")
              : "each of the top-" + std::to_string(routing["top_k"].get<int>()))
      << " over the " << (routing["family"] == "switch" ? "encoder" : "prompt's")
      << " MoE layers\n";
  const bool all = num_experts <= 16;
  if (!all) {
    std::stable_sort(counts.begin(), counts.end(),
                     [](const auto& a, const auto& b) { return a.first > b.first; });
  }
  const size_t shown = all ? counts.size() : std::min<size_t>(10, counts.size());
  out << (all ? "" : "  (10 most chosen)\n");
  for (size_t i = 0; i < shown; ++i) {
    const double pct =
        total > 0 ? 100.0 * static_cast<double>(counts[i].first) / static_cast<double>(total) : 0.0;
    out << "  expert " << std::setw(4) << counts[i].second << "  " << std::setw(12)
        << counts[i].first << "  " << std::setw(5) << pct << "%\n";
  }
  if (!all) {
    out << "  least chosen: expert " << counts.back().second << " (" << counts.back().first
        << ")\n";
  }

  const json& pl = s["per_layer"];
  if (!pl.empty()) {
    out << "per layer       " << std::setw(12) << "tokens" << std::setw(12) << "dropped"
        << std::setw(11) << "drop rate"
        << "\n";
    auto row = [&](bool dec, int b) {
      const std::string key = summary_layer_key(s, dec, b);
      if (!pl.contains(key)) return;
      const json& l = pl[key];
      out << "  " << std::left << std::setw(14) << key << std::right << std::setw(12)
          << l["tokens"].get<int64_t>() << std::setw(12) << l["dropped"].get<int64_t>()
          << std::setw(10) << std::setprecision(2) << 100.0 * l["drop_rate"].get<double>() << "%\n"
          << std::setprecision(1);
    };
    for (const json& b : s["layers"]["encoder"]) row(false, b.get<int>());
    for (const json& b : s["layers"]["decoder"]) row(true, b.get<int>());
  }
  print_fidelity(s, out);
}

}  // namespace moetrace
