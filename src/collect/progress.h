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
  // After each engine batch; tokens: the batch's real (unpadded) tokens.
  void batch_done(int64_t samples, int64_t tokens, const std::string& dataset);
  void samples_skipped(int64_t samples);  // samples without an engine pass (synthetic)
  void finish();

 private:
  void draw(bool force);
  int64_t total_, done_, start_done_, layers_, tokens_ = 0;
  int64_t drawn_done_ = -1, drawn_tokens_ = -1;  // what the last line showed
  bool enabled_, tty_;
  double t0_, last_draw_ = 0;
  std::string dataset_;
};

// The terminal's width for a progress bar: TIOCGWINSZ on fd, else $COLUMNS, else 80.
int terminal_columns(int fd);
// "12/40 samples, 72 traces, 5300 tokens/s, glue/mrpc, ETA 3 s" (no rate without tokens, no
// dataset when empty, no ETA when done or unknown).
std::string progress_text(int64_t done, int64_t total, int64_t layers, int64_t tokens,
                          double seconds, double eta, const std::string& dataset);
// "[####......] TEXT" within columns - 1 characters: the bar shrinks (down to none), then the text
// is cut, so the line never wraps.
std::string progress_bar_line(double frac, const std::string& text, int columns);

// Per-dataset and per-layer tables from the store's manifest.
void print_collect_summary(const std::filesystem::path& store, FILE* out);

}  // namespace moetrace
