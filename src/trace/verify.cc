// verify_store(): every claim of the manifest checked against the shards; print_store_summary().
#include <algorithm>
#include <cmath>
#include <cstdio>
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

}  // namespace

std::vector<std::string> verify_store(const fs::path& dir) {
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

  trace::Stats totals = trace::empty_stats(layout);
  bool counts_complete = true;  // every shard was read, so the totals can be compared
  std::unordered_set<std::string> ids;
  int64_t next = base;
  const size_t n_shards = m["shards"].size();
  for (size_t k = 0; k < n_shards; ++k) {
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
        problem(what, ": ", it.key(), " is ", short_dump(m[it.key()]), " but the shards give ",
                short_dump(it.value()));
      }
    }
  } else {
    problem(what,
            ": counts (num_samples, expert_distribution, per_layer, ...) not checked: "
            "some shards could not be read");
  }
  return problems;
}

void print_store_summary(const fs::path& dir, std::ostream& out) {
  const json m = trace::read_manifest(dir);
  const trace::Layout layout =
      trace::layout_from_manifest(m, (dir / trace::kManifestName).string());
  auto get = [&](const char* key) { return m.contains(key) ? m[key] : json(); };
  auto num = [&](const char* key) -> int64_t {
    const json v = get(key);
    return v.is_number() ? v.get<int64_t>() : 0;
  };
  auto dbl = [&](const char* key) -> double {
    const json v = get(key);
    return v.is_number() ? v.get<double>() : 0.0;
  };
  const bool complete = get("complete") == true;
  int64_t bytes = 0;
  const json shards = get("shards");
  if (shards.is_array()) {
    for (const json& s : shards) bytes += s.value("bytes", int64_t{0});
  }
  const json model = get("model");
  const std::string model_id = model.is_object() && model.contains("id") && model["id"].is_string()
                                   ? model["id"].get<std::string>()
                                   : "?";
  auto layers_str = [](const std::vector<int>& v) {
    return v.empty() ? std::string("none") : json(v).dump();
  };

  out << "trace store     " << dir.string() << "\n";
  out << "status          "
      << (complete
              ? "complete"
              : "INCOMPLETE (interrupted or running; `moetrace collect --resume` continues it)")
      << "\n";
  out << "format          " << kTraceFormat << " v" << kTraceFormatVersion
      << ", written by moetrace "
      << (get("moetrace_version").is_string() ? get("moetrace_version").get<std::string>() : "?")
      << "\n";
  out << "model           " << model_id << "\n";
  out << "samples         " << num("num_samples") << " (" << num("total_traces") << " traces)\n";
  out << "tokens          " << num("num_tokens") << " encoder";
  if (layout.decoder) out << ", " << num("num_decoder_tokens") << " decoder";
  out << "\n";
  out << "shards          " << (shards.is_array() ? shards.size() : 0) << " (" << bytes
      << " bytes, " << layout.samples_per_shard << " samples per shard)\n";
  const json dp = get("data_parallel");
  if (dp.is_object() && dp.contains("ranks") && dp["ranks"].is_array()) {
    out << "data-parallel   " << dp["ranks"].size() << " ranks, merged from " << trace::kRanksDir
        << "/\n";
  }
  if (get("part").is_object()) {
    const trace::Part p = trace::part_from_json(get("part"), (dir / trace::kManifestName).string());
    out << "part            rank " << p.rank << " of " << p.world_size << ": samples ["
        << p.first_sample << ", " << p.first_sample + p.num_samples << ") of " << p.total_samples
        << " (`moetrace merge` assembles the store)\n";
  }
  out << "MoE layers      encoder " << layers_str(layout.enc_layers) << ", decoder "
      << layers_str(layout.dec_layers) << "\n";
  out << "experts         " << layout.num_experts << ", d_model " << layout.d_model << "\n";
  out << "stored          logits " << dtype_name(layout.logits_dtype) << ", hidden "
      << trace::hidden_dtype_name(layout.hidden_dtype) << "\n";
  out << "device          " << (get("device").is_string() ? get("device").get<std::string>() : "?")
      << "\n";
  out << std::fixed << std::setprecision(1);
  out << "collection      " << dbl("collection_time") << " s, " << dbl("throughput_tokens_per_s")
      << " tokens/s\n";

  const json dd = get("dataset_distribution");
  if (dd.is_object() && !dd.empty()) {
    out << "datasets (traces)\n";
    for (auto it = dd.begin(); it != dd.end(); ++it) {
      out << "  " << std::left << std::setw(32) << it.key() << std::right << " "
          << it.value().dump() << "\n";
    }
  }

  const json ed = get("expert_distribution");
  std::vector<std::pair<int64_t, int64_t>> counts;  // (count, expert)
  int64_t total = 0;
  for (int64_t e = 0; e < layout.num_experts; ++e) {
    const std::string key = std::to_string(e);
    const int64_t c =
        ed.is_object() && ed.contains(key) && ed[key].is_number() ? ed[key].get<int64_t>() : 0;
    counts.push_back({c, e});
    total += c;
  }
  out << "experts used    " << num("experts_used") << " of " << layout.num_experts << " ("
      << dbl("diversity_percentage") << "%), top-1 over the encoder MoE layers\n";
  const bool all = layout.num_experts <= 16;
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

  const json pl = get("per_layer");
  if (pl.is_object() && !pl.empty()) {
    out << "per layer       " << std::setw(12) << "tokens" << std::setw(12) << "dropped"
        << std::setw(11) << "drop rate"
        << "\n";
    auto row = [&](bool dec, int b) {
      const std::string key = trace::layer_key(dec, b);
      if (!pl.contains(key) || !pl[key].is_object()) return;
      const json& l = pl[key];
      out << "  " << std::left << std::setw(14) << key << std::right << std::setw(12)
          << l.value("tokens", int64_t{0}) << std::setw(12) << l.value("dropped", int64_t{0})
          << std::setw(10) << std::setprecision(2) << 100.0 * l.value("drop_rate", 0.0) << "%\n"
          << std::setprecision(1);
    };
    for (int b : layout.enc_layers) row(false, b);
    for (int b : layout.dec_layers) row(true, b);
  }
}

}  // namespace moetrace
