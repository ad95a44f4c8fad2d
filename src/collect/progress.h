// Progress of a collection: a live bar on a terminal (samples, traces, tokens/s, current dataset,
// ETA), a log line every few seconds otherwise, and the closing summary table.
#pragma once

#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <string>

namespace moetrace {

double progress_clock();  // seconds, monotonic

class Progress {
 public:
  Progress(int64_t total_samples, int64_t already_done, int64_t layers, bool enabled);
  void batch_done(int64_t samples, int64_t tokens,
                  const std::string& dataset);  // after each engine batch
  void samples_skipped(int64_t samples);        // samples without an engine pass (synthetic)
  void finish();

 private:
  void draw(bool force);
  int64_t total_, done_, start_done_, layers_, tokens_ = 0;
  bool enabled_, tty_;
  double t0_, last_draw_ = 0;
  std::string dataset_;
};

// Per-dataset and per-layer tables from the store's manifest.
void print_collect_summary(const std::filesystem::path& store, FILE* out);

}  // namespace moetrace
