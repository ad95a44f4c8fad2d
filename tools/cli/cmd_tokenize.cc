// `moetrace tokenize`: JSON lines in ({"text": ...}), JSON lines out ({"ids": [...]}), with the
// same T5 tokenizer collection uses, so anyone can check ids against transformers.
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>

#include "command.h"
#include "core/error.h"
#include "data/catalog.h"
#include "io/hf_cache.h"
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

// spiece.model of --model: "demo" or "random:switch-base-N" (the demo tokenizer, as collect uses),
// a model folder, or a Hub id found in the Hugging Face cache (resolved as every --model is).
fs::path spiece_of_model(const std::string& model) {
  if (model == "demo" || model.rfind("random:", 0) == 0) return data::demo_spiece_model();
  const ResolvedModel r = resolve_model(model);
  if (!fs::exists(r.dir / "spiece.model")) {
    fail("--model ", model, ": no spiece.model in ", r.dir.string(),
         "; pass --spm FILE (e.g. the demo tokenizer ", data::demo_spiece_model().string(), ")");
  }
  return r.dir / "spiece.model";
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
