#include "collect/progress.h"

#include <unistd.h>

#include <chrono>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "core/log.h"

namespace moetrace {

double progress_clock() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

Progress::Progress(int64_t total, int64_t already, int64_t layers, bool enabled)
    : total_(total),
      done_(already),
      start_done_(already),
      layers_(layers),
      enabled_(enabled),
      tty_(isatty(STDERR_FILENO) != 0),
      t0_(progress_clock()) {}

void Progress::batch_done(int64_t samples, int64_t tokens, const std::string& dataset) {
  done_ += samples;
  tokens_ += tokens;
  dataset_ = dataset;
  draw(false);
}

void Progress::samples_skipped(int64_t samples) {
  done_ += samples;
  draw(false);
}

void Progress::draw(bool force) {
  if (!enabled_) return;
  const double now = progress_clock();
  if (!force && now - last_draw_ < (tty_ ? 0.2 : 5.0)) return;
  last_draw_ = now;
  const double el = std::max(now - t0_, 1e-9);
  const double rate = static_cast<double>(done_ - start_done_) / el;
  const double eta = rate > 0 ? static_cast<double>(total_ - done_) / rate : 0;
  const double frac = total_ > 0 ? static_cast<double>(done_) / static_cast<double>(total_) : 1.0;
  if (tty_) {
    char bar[31];
    const int fill = static_cast<int>(frac * 30);
    for (int i = 0; i < 30; ++i) bar[i] = i < fill ? '#' : '.';
    bar[30] = 0;
    std::fprintf(stderr, "\r[%s] %lld/%lld samples  %lld traces  %.0f tok/s  %-22.22s ETA %.0fs   ",
                 bar, static_cast<long long>(done_), static_cast<long long>(total_),
                 static_cast<long long>(done_ * layers_), static_cast<double>(tokens_) / el,
                 dataset_.c_str(), eta);
  } else {
    char line[512];
    std::snprintf(line, sizeof line,
                  "collect: %lld/%lld samples (%.0f%%), %lld traces, %.0f tokens/s, %s, ETA %.0f s",
                  static_cast<long long>(done_), static_cast<long long>(total_), 100 * frac,
                  static_cast<long long>(done_ * layers_), static_cast<double>(tokens_) / el,
                  dataset_.c_str(), eta);
    log_info(line);
  }
  std::fflush(stderr);
}

void Progress::finish() {
  if (!enabled_) return;
  draw(true);
  if (tty_) std::fprintf(stderr, "\n");
}

void print_collect_summary(const std::filesystem::path& store, FILE* out) {
  std::ifstream in(store / "manifest.json");
  const nlohmann::json m = nlohmann::json::parse(in, nullptr, false);
  if (m.is_discarded()) return;
  std::fprintf(out, "\n%-34s %10s\n", "dataset", "traces");
  for (auto it = m["dataset_distribution"].begin(); it != m["dataset_distribution"].end(); ++it) {
    std::fprintf(out, "%-34s %10lld\n", it.key().c_str(),
                 static_cast<long long>(it.value().get<int64_t>()));
  }
  std::fprintf(out, "\n%-10s %10s %12s %10s %12s\n", "layer", "tokens", "experts used", "drop rate",
               "top expert");
  const int64_t E = m.value("num_experts", 0);
  // Layers in block order (the JSON object sorts "enc.11" before "enc.3").
  std::vector<std::string> names;
  for (const char* stack : {"encoder", "decoder"}) {
    for (const auto& i : m["layers"].value(stack, nlohmann::json::array())) {
      names.push_back(std::string(stack == std::string("encoder") ? "enc." : "dec.") +
                      std::to_string(i.get<int>()));
    }
  }
  for (const std::string& name : names) {
    if (!m["per_layer"].contains(name)) continue;
    const auto& layer = m["per_layer"][name];
    const auto& counts = layer["expert_counts"];
    int64_t used = 0, top = 0, total = 0;
    for (size_t e = 0; e < counts.size(); ++e) {
      const int64_t c = counts[e].get<int64_t>();
      used += c > 0;
      total += c;
      if (c > counts[static_cast<size_t>(top)].get<int64_t>()) top = static_cast<int64_t>(e);
    }
    const double share = total > 0 ? 100.0 * counts[static_cast<size_t>(top)].get<double>() /
                                         static_cast<double>(total)
                                   : 0;
    std::fprintf(out, "%-10s %10lld %7lld/%-4lld %9.2f%% %6lld (%4.1f%%)\n", name.c_str(),
                 static_cast<long long>(layer.value("tokens", int64_t{0})),
                 static_cast<long long>(used), static_cast<long long>(E),
                 100 * layer.value("drop_rate", 0.0), static_cast<long long>(top), share);
  }
  std::fprintf(out, "\n%lld samples, %lld traces, %lld tokens in %.1f s (%s)\n",
               static_cast<long long>(m.value("num_samples", int64_t{0})),
               static_cast<long long>(m.value("total_traces", int64_t{0})),
               static_cast<long long>(m.value("num_tokens", int64_t{0})),
               m.value("collection_time", 0.0), m.value("device", std::string()).c_str());
}

}  // namespace moetrace
