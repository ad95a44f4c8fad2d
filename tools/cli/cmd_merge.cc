// moetrace merge STORE: writes the manifest of a data-parallel store once every rank's part is
// complete (docs/SCALING.md). Idempotent; ranks usually do it themselves when the last one
// finishes.
#include <iostream>
#include <string>

#include "command.h"
#include "core/error.h"
#include "trace/store.h"

namespace moetrace::cli {
namespace {

void run_merge(const std::string& store) {
  const MergeResult r = merge_store(store);
  if (r.world_size == 0) {
    const TraceStore s = TraceStore::open(store);
    if (s.manifest().value("complete", false) != true) {
      fail(store, ": a single-process store that is not complete; continue it with `moetrace ",
           "collect --resume`");
    }
    std::cout << "OK " << store << ": a single-process store, nothing to merge\n";
    return;
  }
  if (!r.merged) {
    std::string pending;
    for (const auto& p : r.pending) pending += (pending.empty() ? "" : ", ") + p;
    fail(store, ": not merged: ", r.pending.size(), " of ", r.world_size,
         " ranks are not complete: ", pending, "; rerun each with the same command plus --resume");
  }
  std::cout << "OK " << store << ": merged " << r.world_size << " ranks, " << r.num_samples
            << " samples in " << r.num_shards << " shards -> " << store << "/manifest.json\n";
}

const RegisterCommand reg([](CLI::App& app) {
  auto store = std::make_shared<std::string>();
  CLI::App* cmd = app.add_subcommand(
      "merge",
      "Assemble a data-parallel store's manifest once all ranks are complete (idempotent)");
  cmd->add_option("STORE", *store, "trace store directory (holds ranks/)")->required();
  cmd->callback([store] { run_merge(*store); });
});

}  // namespace
}  // namespace moetrace::cli
