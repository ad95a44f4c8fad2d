#include "collect/progress.h"

#include <sys/ioctl.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "core/keys.h"
#include "core/log.h"
#include "trace/store.h"

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

int terminal_columns(int fd) {
  struct winsize ws {};
  if (ioctl(fd, TIOCGWINSZ, &ws) == 0 && ws.ws_col > 0) return ws.ws_col;
  if (const char* c = std::getenv("COLUMNS")) {
    const int n = std::atoi(c);
    if (n > 0) return n;
  }
  return 80;
}

std::string progress_text(int64_t done, int64_t total, int64_t layers, int64_t tokens,
                          double seconds, double eta, const std::string& dataset) {
  std::string s = std::to_string(done) + "/" + std::to_string(total) + " samples, " +
                  std::to_string(done * layers) + " traces";
  char buf[64];
  if (tokens > 0 && seconds > 0) {  // synthetic samples run no engine: no rate to show
    std::snprintf(buf, sizeof buf, ", %.0f tokens/s", static_cast<double>(tokens) / seconds);
    s += buf;
  }
  if (!dataset.empty()) s += ", " + dataset;
  if (done < total && eta > 0) {
    std::snprintf(buf, sizeof buf, ", ETA %.0f s", eta);
    s += buf;
  }
  return s;
}

std::string progress_bar_line(double frac, const std::string& text, int columns) {
  // One column stays free: a line as wide as the terminal wraps on some of them.
  const int width = std::max(columns - 1, 8);
  const int room = width - static_cast<int>(text.size()) - 3;  // "[" "] " around the bar
  const int bar = std::clamp(room, 0, 30);
  std::string line;
  if (bar >= 5) {
    const int fill = static_cast<int>(std::clamp(frac, 0.0, 1.0) * bar);
    line.push_back('[');
    line.append(static_cast<size_t>(fill), '#');
    line.append(static_cast<size_t>(bar - fill), '.');
    line.append("] ");
  }
  line += text;
  if (static_cast<int>(line.size()) > width) line.resize(static_cast<size_t>(width));
  return line;
}

void Progress::draw(bool force) {
  if (!enabled_) return;
  const double now = progress_clock();
  if (!force && now - last_draw_ < (tty_ ? 0.2 : 5.0)) return;
  if (force && done_ == drawn_done_ && tokens_ == drawn_tokens_) return;  // nothing new to say
  last_draw_ = now;
  drawn_done_ = done_;
  drawn_tokens_ = tokens_;
  const double el = std::max(now - t0_, 1e-9);
  const double rate = static_cast<double>(done_ - start_done_) / el;
  const double eta = rate > 0 ? static_cast<double>(total_ - done_) / rate : 0;
  const double frac = total_ > 0 ? static_cast<double>(done_) / static_cast<double>(total_) : 1.0;
  const std::string text = progress_text(done_, total_, layers_, tokens_, el, eta, dataset_);
  if (tty_) {
    const std::string line = progress_bar_line(frac, text, terminal_columns(STDERR_FILENO));
    // \r, the line, then clear to the end of the line (a shorter line leaves no tail behind).
    std::fprintf(stderr, "\r%s\033[K", line.c_str());
  } else {
    char pct[16];
    std::snprintf(pct, sizeof pct, " (%.0f%%)", 100 * frac);
    std::string line = "collect: " + text;
    line.insert(line.find(" samples") + 8, pct);
    log_info(line);
  }
  std::fflush(stderr);
}

void Progress::finish() {
  if (!enabled_) return;
  draw(true);
  if (tty_ && drawn_done_ >= 0) std::fprintf(stderr, "\n");
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
  // Layers in block order (the JSON object sorts "enc.11" before "enc.3"); a language model's are
  // lm.{i} / gen.{i}, without expert capacity.
  const nlohmann::json routing = m.value("routing", nlohmann::json::object());
  const bool lm = is_lm_family(routing.value("family", std::string("switch")));
  const bool capacity = routing.value("dropped", true);
  std::vector<std::string> names;
  for (const char* stack : {"encoder", "decoder"}) {
    for (const auto& i : m["layers"].value(stack, nlohmann::json::array())) {
      names.push_back(
          keys::layer(keys::stack_of(stack == std::string("decoder"), lm), i.get<int>()));
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
    char drop[16] = "         -";  // no capacity: nothing is dropped by design
    if (capacity) std::snprintf(drop, sizeof drop, "%9.2f%%", 100 * layer.value("drop_rate", 0.0));
    std::fprintf(out, "%-10s %10lld %7lld/%-4lld %s %6lld (%4.1f%%)\n", name.c_str(),
                 static_cast<long long>(layer.value("tokens", int64_t{0})),
                 static_cast<long long>(used), static_cast<long long>(E), drop,
                 static_cast<long long>(top), share);
  }
  std::fprintf(out, "\n%lld samples, %lld traces, %lld tokens in %.1f s, %.1f tokens/s (%s)\n",
               static_cast<long long>(m.value("num_samples", int64_t{0})),
               static_cast<long long>(m.value("total_traces", int64_t{0})),
               static_cast<long long>(m.value("num_tokens", int64_t{0})),
               m.value("collection_time", 0.0), m.value("throughput_tokens_per_s", 0.0),
               m.value("device", std::string()).c_str());
}

}  // namespace moetrace
