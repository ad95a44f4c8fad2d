// moetrace verify STORE: checks every shard of a trace store against its manifest (sizes, sha256,
// tensor layout, value ranges, recomputed counts).
#include <iostream>
#include <string>

#include "command.h"
#include "core/error.h"
#include "trace/store.h"

namespace moetrace::cli {
namespace {

struct VerifyOptions {
  std::string store;
};

void run_verify(const VerifyOptions& o) {
  const auto problems = verify_store(o.store);
  if (!problems.empty()) {
    for (const auto& p : problems) std::cout << "FAIL " << p << "\n";
    std::cout.flush();
    fail(o.store, ": ", problems.size(), problems.size() == 1 ? " problem" : " problems", " found");
  }
  const TraceStore s = TraceStore::open(o.store);
  const auto& m = s.manifest();
  int64_t bytes = 0;
  for (const auto& sh : m["shards"]) bytes += sh["bytes"].get<int64_t>();
  std::cout << "OK " << o.store << ": " << s.num_samples() << " samples, "
            << m["num_tokens"].get<int64_t>() << " tokens, " << m["total_traces"].get<int64_t>()
            << " traces, " << s.num_shards() << " shards, " << bytes << " bytes"
            << (m["complete"] == true ? ""
                                      : " (incomplete: `moetrace collect --resume` continues it)")
            << "\n";
}

RegisterCommand reg([](CLI::App& app) {
  auto opts = std::make_shared<VerifyOptions>();
  CLI::App* cmd = app.add_subcommand(
      "verify",
      "Check a trace store: shard sizes and sha256, tensor layout, counts of the manifest");
  cmd->add_option("STORE", opts->store, "trace store directory")->required();
  cmd->callback([opts] { run_verify(*opts); });
});

}  // namespace
}  // namespace moetrace::cli
