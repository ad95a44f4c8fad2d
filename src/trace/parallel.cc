// Data-parallel stores: where each rank writes (STORE/ranks/rank-RRRRR-of-WWWWW/), what a rank must
// refuse before it starts, and merge_store(), which lists every rank's shards in one manifest.
#include <unistd.h>

#include <algorithm>
#include <fstream>
#include <map>
#include <set>
#include <sstream>

#include "core/error.h"
#include "core/log.h"
#include "trace/schema.h"
#include "trace/store.h"

namespace moetrace {

namespace fs = std::filesystem;
using json = nlohmann::json;

fs::path rank_store_dir(const fs::path& store, int rank, int world_size) {
  return store / trace::kRanksDir / trace::rank_dir_name(rank, world_size);
}

namespace {

// World size of a merged manifest (its data_parallel.world_size), 0 for any other store.
int merged_world_size(const fs::path& store) {
  std::ifstream in(store / trace::kManifestName, std::ios::binary);
  if (!in) return 0;
  const json m = json::parse(in, nullptr, false);
  if (m.is_discarded() || !m.is_object() || !m.contains("data_parallel")) return 0;
  const json& dp = m["data_parallel"];
  return dp.is_object() && dp.contains("world_size") && dp["world_size"].is_number_integer()
             ? dp["world_size"].get<int>()
             : 0;
}

void remove_path(const fs::path& p) {
  std::error_code ec;
  fs::remove_all(p, ec);
  if (ec && ec != std::errc::no_such_file_or_directory)
    fail(p.string(), ": cannot remove: ", ec.message());
}

std::string join(const std::vector<std::string>& v, const std::string& sep) {
  std::string s;
  for (const auto& x : v) s += (s.empty() ? "" : sep) + x;
  return s;
}

}  // namespace

void prepare_parallel_store(const fs::path& store, int rank, int world_size, OpenMode mode) {
  MT_ASSERT(world_size >= 1 && rank >= 0 && rank < world_size);
  const bool overwrite = mode == OpenMode::kOverwrite;
  const bool cleaner = overwrite && rank == 0;  // the one process that removes shared leftovers
  const std::string again = "; use --overwrite to replace it";
  std::error_code ec;
  if (fs::exists(store, ec) && !fs::is_directory(store, ec))
    fail(store.string(), ": exists and is not a directory");

  // Parts in ranks/: this run's world size, or leftovers of another.
  const fs::path ranks = store / trace::kRanksDir;
  if (fs::is_directory(ranks, ec)) {
    for (const auto& ent : fs::directory_iterator(ranks)) {
      const std::string name = ent.path().filename().string();
      int r, w;
      if (!trace::parse_rank_dir_name(name, &r, &w)) {
        fail(ent.path().string(), ": is not a rank directory (rank-RRRRR-of-WWWWW); refusing to ",
             "mix a collection with other files");
      }
      if (w == world_size && world_size > 1) continue;
      if (cleaner) {
        remove_path(ent.path());
      } else if (!overwrite) {
        fail(store.string(), ": holds the parts of a data-parallel collection of world size ", w,
             " (", trace::kRanksDir, "/", name, "); resume it with world size ", w,
             " or use --overwrite");
      }
    }
    if (cleaner && world_size == 1) remove_path(ranks);
  } else if (fs::exists(ranks, ec)) {
    fail(ranks.string(), ": exists and is not a directory");
  }

  if (world_size == 1) return;  // the single-process writer checks its own files

  // The top level: a merged manifest of this world size, or a single-process store, or others.
  if (fs::is_directory(store, ec)) {
    for (const auto& ent : fs::directory_iterator(store)) {
      const std::string name = ent.path().filename().string();
      if (name == trace::kRanksDir || name.rfind(trace::kTmpPrefix, 0) == 0 ||
          name == kStoreLockName)
        continue;
      int64_t index;
      const bool store_file =
          name == trace::kManifestName || trace::parse_shard_file_name(name, &index);
      if (!store_file) {
        fail(store.string(), ": holds files that are not part of a trace store (", name,
             "); refusing to write into it");
      }
      const bool merged_here =
          name == trace::kManifestName && merged_world_size(store) == world_size;
      if (merged_here) {
        if (mode == OpenMode::kCreate) {
          fail(store.string(),
               ": is not empty (it holds a trace store); use --resume or --overwrite");
        }
        // This rank's overwrite makes the merged manifest stale; a resume keeps it until the
        // next merge rewrites it.
        if (overwrite) remove_path(ent.path());
      } else if (cleaner) {
        remove_path(ent.path());
      } else if (!overwrite) {
        fail(store.string(), ": holds a single-process trace store (", name, ")", again);
      }
    }
  }
  fs::create_directories(ranks, ec);
  if (ec && !fs::is_directory(ranks))
    fail(ranks.string(), ": cannot create the directory: ", ec.message());
}

MergeResult merge_store(const fs::path& store) {
  MergeResult res;
  std::error_code ec;
  const fs::path ranks = store / trace::kRanksDir;
  if (!fs::is_directory(ranks, ec)) {
    if (is_trace_store(store) && merged_world_size(store) == 0) return res;  // single-process
    fail(store.string(), ": not a data-parallel trace store (no ", trace::kRanksDir,
         "/ directory)");
  }
  std::map<int, std::set<int>> by_world;  // world size -> ranks present
  for (const auto& ent : fs::directory_iterator(ranks)) {
    const std::string name = ent.path().filename().string();
    int r, w;
    if (!trace::parse_rank_dir_name(name, &r, &w))
      fail(ent.path().string(), ": is not a rank directory (rank-RRRRR-of-WWWWW)");
    by_world[w].insert(r);
  }
  if (by_world.empty()) fail(ranks.string(), ": is empty: no rank has started");
  if (by_world.size() > 1) {
    std::vector<std::string> sizes;
    for (const auto& [w, rs] : by_world) sizes.push_back(std::to_string(w));
    fail(ranks.string(), ": holds parts of world sizes ", join(sizes, " and "),
         "; rerun with --overwrite");
  }
  const int W = by_world.begin()->first;
  res.world_size = W;

  struct RankStore {
    int rank;
    std::string dir;  // "ranks/rank-..."
    json m;
    trace::Layout layout;
    trace::Part part;
  };
  std::vector<RankStore> parts;
  for (int r = 0; r < W; ++r) {
    RankStore rs;
    rs.rank = r;
    rs.dir = std::string(trace::kRanksDir) + "/" + trace::rank_dir_name(r, W);
    const fs::path dir = store / rs.dir;
    if (!fs::exists(dir / trace::kManifestName, ec)) {
      res.pending.push_back("rank " + std::to_string(r) + " (not started)");
      continue;
    }
    const std::string what = (dir / trace::kManifestName).string();
    rs.m = trace::read_manifest(dir);
    rs.layout = trace::layout_from_manifest(rs.m, what);
    if (!rs.m.contains("part")) fail(what, ": has no \"part\": not a rank's store");
    rs.part = trace::part_from_json(rs.m["part"], what);
    if (rs.part.rank != r || rs.part.world_size != W) {
      fail(what, ": its part is rank ", rs.part.rank, " of ", rs.part.world_size,
           ", but it lies in ", rs.dir);
    }
    const int64_t have = rs.m.value("num_samples", int64_t{-1});
    if (rs.m.value("complete", false) != true || have != rs.part.num_samples) {
      res.pending.push_back("rank " + std::to_string(r) + " (" +
                            std::to_string(std::max<int64_t>(0, have)) + " of " +
                            std::to_string(rs.part.num_samples) + " samples)");
      continue;
    }
    parts.push_back(std::move(rs));
  }
  if (!res.pending.empty()) return res;

  // Every rank ran the same collection: all but "part" and the per-run fields agree.
  const RankStore& r0 = parts.front();
  for (const RankStore& rs : parts) {
    for (const char* key :
         {"settings", "model", "layers", "num_experts", "d_model", "logits_dtype", "hidden_dtype",
          "decoder", "routing", "logits_topk", "samples_per_shard"}) {
      const json a = r0.m.contains(key) ? r0.m[key] : json();
      const json b = rs.m.contains(key) ? rs.m[key] : json();
      if (a != b) {
        std::string sa = a.dump(), sb = b.dump();
        if (sa.size() > 80) sa = sa.substr(0, 77) + "...";
        if (sb.size() > 80) sb = sb.substr(0, 77) + "...";
        fail(store.string(), ": rank ", rs.rank, " was collected with other settings than rank 0 (",
             key, ": ", sb, " vs ", sa, "); rerun it with --overwrite and the same options");
      }
    }
    if (rs.part.total_samples != r0.part.total_samples) {
      fail(store.string(), ": rank ", rs.rank, " plans ", rs.part.total_samples,
           " samples in all, rank 0 ", r0.part.total_samples);
    }
  }

  // The ranks tile [0, total) in rank order; their shards, in order, are the store's.
  trace::ManifestFields f;
  f.layout = r0.layout;
  f.totals = trace::empty_stats(f.layout);
  nlohmann::ordered_json ranks_json = nlohmann::ordered_json::array();
  int64_t next = 0;
  std::vector<std::string> devices;
  for (const RankStore& rs : parts) {
    const std::string what = (store / rs.dir / trace::kManifestName).string();
    if (rs.part.first_sample != next) {
      fail(what, ": rank ", rs.rank, " starts at sample ", rs.part.first_sample, ", expected ",
           next, " (the end of rank ", rs.rank - 1, ")");
    }
    if (!rs.m.contains("shards") || !rs.m["shards"].is_array())
      fail(what, ": \"shards\" must be an array");
    const int64_t first_shard = rs.part.first_sample / f.layout.samples_per_shard;
    int64_t shard_next = rs.part.first_sample;
    for (size_t k = 0; k < rs.m["shards"].size(); ++k) {
      const std::string ew = what + ": shards[" + std::to_string(k) + "]";
      trace::ShardEntry e = trace::shard_entry_from_json(rs.m["shards"][k], ew);
      const std::string want = trace::shard_file_name(first_shard + static_cast<int64_t>(k));
      if (e.file != want || e.first_sample != shard_next)
        fail(ew, ": expected ", want, " starting at sample ", shard_next);
      const fs::path p = store / rs.dir / e.file;
      const auto size = fs::file_size(p, ec);
      if (ec)
        fail(p.string(), ": missing (", ec.message(), "); rerun rank ", rs.rank, " with --resume");
      if (static_cast<int64_t>(size) != e.bytes) {
        fail(p.string(), ": has ", size, " bytes, its manifest says ", e.bytes,
             " (run `moetrace verify ", (store / rs.dir).string(), "`)");
      }
      shard_next += e.num_samples;
      e.file = rs.dir + "/" + e.file;
      f.shards.push_back(std::move(e));
    }
    if (shard_next != rs.part.first_sample + rs.part.num_samples)
      fail(what, ": its shards hold ", shard_next - rs.part.first_sample, " samples, its part ",
           rs.part.num_samples);
    f.totals.add(trace::stats_from_manifest(rs.m, f.layout, what));
    const double t = rs.m.value("collection_time", 0.0);
    const std::string device = rs.m.value("device", std::string());
    f.collection_time = std::max(f.collection_time, t);
    devices.push_back(device);
    nlohmann::ordered_json rj;
    rj["rank"] = rs.rank;
    rj["dir"] = rs.dir;
    rj["first_sample"] = rs.part.first_sample;
    rj["num_samples"] = rs.part.num_samples;
    rj["collection_time"] = t;
    rj["device"] = device;
    ranks_json.push_back(std::move(rj));
    next += rs.part.num_samples;
  }
  if (next != r0.part.total_samples) {
    fail(store.string(), ": the ranks hold ", next, " samples, their plan ", r0.part.total_samples);
  }
  f.complete = true;
  f.command_line = r0.m.value("command_line", std::vector<std::string>{});
  f.settings = r0.m.contains("settings") ? r0.m["settings"] : json();
  f.model = r0.m.contains("model") ? r0.m["model"] : json();
  f.engine = r0.m.contains("engine") ? r0.m["engine"] : json();
  // Each rank audited its own part (collect --audit): one object for the whole store.
  std::vector<std::optional<Fidelity>> audits;
  for (const RankStore& rs : parts)
    audits.push_back(manifest_fidelity(rs.m, (store / rs.dir / trace::kManifestName).string()));
  f.fidelity = trace::merge_fidelity(audits);
  f.data_parallel["world_size"] = W;
  f.data_parallel["ranks"] = std::move(ranks_json);
  const bool same_device =
      std::all_of(devices.begin(), devices.end(), [&](const auto& d) { return d == devices[0]; });
  f.device = same_device ? std::to_string(W) + " ranks, each " + devices[0] : join(devices, "; ");
  const std::string bytes = trace::build_manifest(f).dump(2) + "\n";

  // Unchanged: nothing to write (re-running merge is free). Else a name no other rank uses.
  std::ifstream in(store / trace::kManifestName, std::ios::binary);
  std::ostringstream old;
  if (in) old << in.rdbuf();
  if (!in || old.str() != bytes) {
    char host[256] = "host";
    ::gethostname(host, sizeof(host) - 1);
    trace::atomic_write_file(store, trace::kManifestName, bytes,
                             "." + std::string(host) + "." + std::to_string(::getpid()));
  }
  res.merged = true;
  res.num_samples = next;
  res.num_shards = static_cast<int64_t>(f.shards.size());
  return res;
}

}  // namespace moetrace
