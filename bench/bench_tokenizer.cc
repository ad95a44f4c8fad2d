// Tokenizer throughput: every tokenizer of a list of model directories encodes the same corpus of
// real text (lines of a text file, default the repo's wikitext-2 validation split) on 1 and on
// --threads threads sharing one tokenizer, first with a cold word cache, then warm. Prints a table
// and writes JSON (date, machine).
//
//   bench_tokenizer [--texts FILE] [--threads N] [--repeat R] [--json FILE] [DIR...]
// DIR defaults to the fixtures of tests/data/tokenizers_lm and tests/data/t5-spiece.
#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>
#include <vector>

#include "bench/bench_util.h"
#include "text/text_tokenizer.h"

using namespace moetrace;
namespace fs = std::filesystem;

namespace {

struct Run {
  double seconds = 0;
  int64_t tokens = 0;
};

Run encode_all(const TextTokenizer& tok, const std::vector<std::string>& texts, int threads,
               int repeat) {
  std::vector<int64_t> tokens(static_cast<size_t>(threads), 0);
  double t0 = bench::now_s();
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] {
      for (int r = 0; r < repeat; ++r) {
        for (size_t i = static_cast<size_t>(t); i < texts.size(); i += threads) {
          tokens[static_cast<size_t>(t)] += static_cast<int64_t>(tok.encode(texts[i]).size());
        }
      }
    });
  }
  for (auto& th : pool) th.join();
  Run run;
  run.seconds = bench::now_s() - t0;
  for (int64_t n : tokens) run.tokens += n;
  return run;
}

}  // namespace

int main(int argc, char** argv) {
  fs::path texts_path = fs::path(MOETRACE_SOURCE_DIR) / "tests/data/wikitext2_tokens/valid.txt";
  int threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  int repeat = 3;
  std::string json_path;
  std::vector<fs::path> dirs;
  for (int i = 1; i < argc; ++i) {
    const std::string k = argv[i];
    auto value = [&] {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "bench_tokenizer: %s needs a value\n", k.c_str());
        std::exit(2);
      }
      return std::string(argv[++i]);
    };
    if (k == "--texts") {
      texts_path = value();
    } else if (k == "--threads") {
      threads = std::stoi(value());
    } else if (k == "--repeat") {
      repeat = std::stoi(value());
    } else if (k == "--json") {
      json_path = value();
    } else if (k.starts_with("--")) {
      std::fprintf(stderr, "bench_tokenizer: unknown option %s\n", k.c_str());
      return 2;
    } else {
      dirs.emplace_back(k);
    }
  }
  if (dirs.empty()) {
    const fs::path data = fs::path(MOETRACE_SOURCE_DIR) / "tests/data";
    for (const char* d : {"tokenizers_lm/qwen2_bpe", "tokenizers_lm/olmoe_bpe",
                          "tokenizers_lm/llama_spm", "t5-spiece"}) {
      dirs.push_back(data / d);
    }
  }
  std::vector<std::string> texts;
  int64_t bytes = 0;
  {
    std::ifstream in(texts_path);
    if (!in) {
      std::fprintf(stderr, "bench_tokenizer: cannot read %s\n", texts_path.c_str());
      return 1;
    }
    std::string line;
    while (std::getline(in, line)) {
      if (line.find_first_not_of(' ') == std::string::npos) continue;
      bytes += static_cast<int64_t>(line.size());
      texts.push_back(std::move(line));
    }
  }
  std::printf("bench_tokenizer: %zu texts, %.2f MB (%s), %d repeats, CPU %s\n", texts.size(),
              bytes / 1e6, texts_path.filename().c_str(), repeat, bench::cpu_model().c_str());
  std::printf("%-12s %-10s %7s %6s %12s %10s\n", "tokenizer", "kind", "threads", "cache",
              "tokens/s", "MB/s");
  nlohmann::json rows = nlohmann::json::array();
  for (const fs::path& dir : dirs) {
    std::vector<int> thread_counts{1};
    if (threads > 1) thread_counts.push_back(threads);
    for (int n : thread_counts) {
      auto tok = load_text_tokenizer(dir);  // fresh: its word cache starts cold
      for (const char* cache : {"cold", "warm"}) {
        Run run = encode_all(*tok, texts, n, std::string(cache) == "cold" ? 1 : repeat);
        int reps = std::string(cache) == "cold" ? 1 : repeat;
        double tps = run.tokens / run.seconds;
        double mbs = bytes * reps / run.seconds / 1e6;
        std::printf("%-12s %-10s %7d %6s %12.0f %10.2f\n", dir.filename().c_str(),
                    std::string(tok->kind()).c_str(), n, cache, tps, mbs);
        rows.push_back({{"tokenizer", dir.filename().string()},
                        {"kind", tok->kind()},
                        {"threads", n},
                        {"cache", cache},
                        {"tokens_per_s", tps},
                        {"mb_per_s", mbs}});
      }
    }
  }
  if (!json_path.empty()) {
    nlohmann::json out = {{"benchmark", "bench_tokenizer"},
                          {"date", bench::today_utc()},
                          {"host", bench::hostname()},
                          {"cpu", bench::cpu_model()},
                          {"texts", texts_path.string()},
                          {"n_texts", texts.size()},
                          {"bytes", bytes},
                          {"rows", rows}};
    std::ofstream(json_path) << out.dump(2) << "\n";
  }
  return 0;
}
