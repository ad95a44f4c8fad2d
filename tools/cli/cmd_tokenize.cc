// `moetrace tokenize`: JSON lines in ({"text": ...}), JSON lines out ({"ids": [...]}), with the
// same T5 tokenizer collection uses, so anyone can check ids against transformers.
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>

#include "command.h"
#include "core/error.h"
#include "data/catalog.h"
#include "text/tokenizer.h"

namespace moetrace::cli {

namespace {

namespace fs = std::filesystem;

struct TokenizeOptions {
  std::string model;
  std::string spm;
  std::string input = "-";
  int max_length = 0;
};

// spiece.model of --model: "demo", a model folder, or a Hub id found in the Hugging Face cache.
fs::path spiece_of_model(const std::string& model) {
  if (model == "demo") return data::demo_spiece_model();
  if (fs::is_directory(model)) {
    if (!fs::exists(fs::path(model) / "spiece.model"))
      fail(model, ": no spiece.model in this folder");
    return fs::path(model) / "spiece.model";
  }
  std::vector<fs::path> caches;
  if (const char* v = std::getenv("HF_HUB_CACHE"); v && *v) {
    caches.emplace_back(v);
  } else if (const char* h = std::getenv("HF_HOME"); h && *h) {
    caches.push_back(fs::path(h) / "hub");
  } else if (const char* home = std::getenv("HOME"); home && *home) {
    caches.push_back(fs::path(home) / ".cache/huggingface/hub");
  }
  std::string dir = "models--" + model;
  for (size_t p = dir.find('/'); p != std::string::npos; p = dir.find('/')) dir.replace(p, 1, "--");
  for (const auto& cache : caches) {
    fs::path repo = cache / dir;
    std::string rev;
    std::ifstream ref(repo / "refs/main");
    if (ref && std::getline(ref, rev) && fs::exists(repo / "snapshots" / rev / "spiece.model")) {
      return repo / "snapshots" / rev / "spiece.model";
    }
    std::error_code ec;
    for (const auto& snap : fs::directory_iterator(repo / "snapshots", ec)) {
      if (fs::exists(snap.path() / "spiece.model")) return snap.path() / "spiece.model";
    }
  }
  fail("--model ", model, ": not a folder with spiece.model nor found in the Hugging Face cache");
}

void run(const TokenizeOptions& o) {
  if (o.model.empty() == o.spm.empty()) fail("tokenize: give exactly one of --model or --spm");
  const T5Tokenizer tok =
      T5Tokenizer::load(o.spm.empty() ? spiece_of_model(o.model) : fs::path(o.spm));
  std::ifstream file;
  std::istream* in = &std::cin;
  if (o.input != "-") {
    file.open(o.input);
    if (!file) fail(o.input, ": cannot open");
    in = &file;
  }
  const std::string source = o.input == "-" ? "stdin" : o.input;
  std::string line;
  for (int64_t n = 1; std::getline(*in, line); ++n) {
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    auto row = nlohmann::json::parse(line, nullptr, false);
    if (row.is_discarded() || !row.is_object() || !row.contains("text") ||
        !row["text"].is_string()) {
      fail(source, ": line ", n, ": expected a JSON object with a string \"text\"");
    }
    nlohmann::json out{{"ids", tok.encode(row["text"].get<std::string>(), o.max_length)}};
    std::cout << out.dump() << '\n';
  }
  std::cout.flush();
}

RegisterCommand reg([](CLI::App& app) {
  auto opts = std::make_shared<TokenizeOptions>();
  auto* cmd = app.add_subcommand("tokenize",
                                 "T5-tokenize JSON lines {\"text\": ...} into {\"ids\": [...]}");
  cmd->add_option("--model", opts->model,
                  "model folder or Hub id (its spiece.model, from the HF cache), or \"demo\"");
  cmd->add_option("--spm", opts->spm, "a SentencePiece spiece.model file");
  cmd->add_option("--max-length", opts->max_length,
                  "truncate to N ids, keeping the final </s> (0: no limit)")
      ->check(CLI::NonNegativeNumber);
  cmd->add_option("--input", opts->input, "JSON lines file (default: stdin)");
  cmd->callback([opts] { run(*opts); });
});

}  // namespace

}  // namespace moetrace::cli
