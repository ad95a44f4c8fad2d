// moetrace verify STORE: checks every shard of a trace store against its manifest (sizes, sha256,
// tensor layout, value ranges, recomputed counts). A progress bar on stderr while it hashes (on a
// terminal only; --no-progress or -q turn it off); --json prints the result as one JSON object
// (keys in docs/TRACE_FORMAT.md).
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <iostream>
#include <nlohmann/json.hpp>
#include <string>

#include "collect/progress.h"
#include "command.h"
#include "core/error.h"
#include "trace/store.h"

namespace moetrace::cli {
namespace {

struct VerifyOptions {
  std::string store;
  bool json = false;
  bool no_progress = false;
};

// "verify  [#######.......]  12/63 shards  1.2 of 5.3 GB  ETA 4 s", fitted to the terminal width
// and redrawn at most 10 times a second; cleared when done so the result line stands alone.
class VerifyBar {
 public:
  void update(int64_t shards_done, int64_t shards_total, int64_t bytes_done, int64_t bytes_total) {
    const double now = seconds();
    if (shards_done < shards_total && now - last_ < 0.1) return;
    last_ = now;
    char tail[128];
    const double frac = bytes_total > 0    ? static_cast<double>(bytes_done) / bytes_total
                        : shards_total > 0 ? double(shards_done) / shards_total
                                           : 1.0;
    const double eta = frac > 0 ? (now - start_) * (1 - frac) / frac : 0;
    std::snprintf(tail, sizeof tail, "  %lld/%lld shards  %.2f of %.2f GB  ETA %.0f s",
                  static_cast<long long>(shards_done), static_cast<long long>(shards_total),
                  static_cast<double>(bytes_done) / 1e9, static_cast<double>(bytes_total) / 1e9,
                  eta);
    const int width = terminal_width();
    const std::string head = "verify  [";
    const int bar = width - 1 - static_cast<int>(head.size() + 1 + std::string(tail).size());
    std::string line = head;
    if (bar >= 5) {
      const int filled = static_cast<int>(frac * bar);
      line += std::string(filled, '#') + std::string(bar - filled, '.') + "]";
    } else {
      line = "verify";
    }
    line += tail;
    if (static_cast<int>(line.size()) > width - 1) line.resize(std::max(0, width - 1));
    std::fprintf(stderr, "\r%s\033[K", line.c_str());
    std::fflush(stderr);
    drawn_ = true;
  }
  ~VerifyBar() {
    if (drawn_) {
      std::fprintf(stderr, "\r\033[K");
      std::fflush(stderr);
    }
  }

 private:
  static double seconds() {
    return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch())
        .count();
  }
  static int terminal_width() {
    const int w = terminal_columns(STDERR_FILENO);  // collect's progress bar asks the same way
    return w >= 20 ? w : 80;
  }
  double start_ = seconds(), last_ = -1;
  bool drawn_ = false;
};

void run_verify(const VerifyOptions& o) {
  std::vector<std::string> problems;
  {
    std::optional<VerifyBar> bar;
    VerifyProgress progress;
    if (progress_wanted(o.no_progress)) {
      bar.emplace();
      progress = [&bar](int64_t s, int64_t st, int64_t b, int64_t bt) {
        bar->update(s, st, b, bt);
      };
    }
    problems = verify_store(o.store, progress);
  }
  nlohmann::json j = {{"store", o.store}, {"ok", problems.empty()}, {"problems", problems}};
  if (problems.empty()) {
    const TraceStore s = TraceStore::open(o.store);
    const auto& m = s.manifest();
    int64_t bytes = 0;
    for (const auto& sh : m["shards"]) bytes += sh["bytes"].get<int64_t>();
    j["complete"] = m["complete"] == true;
    j["num_samples"] = s.num_samples();
    j["num_tokens"] = m["num_tokens"].get<int64_t>();
    j["total_traces"] = m["total_traces"].get<int64_t>();
    j["num_shards"] = s.num_shards();
    j["bytes"] = bytes;
  }
  if (o.json) {
    std::cout << j.dump(2) << "\n";
  } else if (!problems.empty()) {
    for (const auto& p : problems) std::cout << "FAIL " << p << "\n";
  } else {
    std::cout << "OK " << o.store << ": " << j["num_samples"] << " samples, " << j["num_tokens"]
              << " tokens, " << j["total_traces"] << " traces, " << j["num_shards"] << " shards, "
              << j["bytes"] << " bytes"
              << (j["complete"] == true ? ""
                                        : " (incomplete: `moetrace collect --resume` continues it)")
              << "\n";
  }
  std::cout.flush();
  if (!problems.empty()) {
    fail(o.store, ": ", problems.size(), problems.size() == 1 ? " problem" : " problems", " found");
  }
}

RegisterCommand reg([](CLI::App& app) {
  auto opts = std::make_shared<VerifyOptions>();
  CLI::App* cmd = app.add_subcommand(
      "verify",
      "Check a trace store: shard sizes and sha256, tensor layout, counts of the manifest");
  cmd->add_option("STORE", opts->store, "trace store directory (or its manifest.json)")->required();
  cmd->add_flag("--json", opts->json,
                "print {store, ok, problems, complete, num_samples, ...} as JSON "
                "(docs/TRACE_FORMAT.md)");
  cmd->add_flag("--no-progress", opts->no_progress,
                "no progress bar (it is drawn on a terminal only, on stderr)");
  cmd->callback([opts] {
    VerifyOptions o = *opts;
    o.store = store_dir_of(o.store);
    run_verify(o);
  });
});

}  // namespace
}  // namespace moetrace::cli
