// moetrace inspect M|STORE [--json]: a model's resolved files, config, sparse blocks, parameters
// and dtypes, with every tensor checked against config.json (non-zero exit on a mismatch); or a
// trace store's summary (STORE or STORE/manifest.json). JSON keys: docs/TRACE_FORMAT.md.
#include <cstdio>
#include <iostream>
#include <map>
#include <nlohmann/json.hpp>

#include "collect/model_source.h"
#include "command.h"
#include "core/error.h"
#include "data/catalog.h"
#include "io/hf_cache.h"
#include "model/config.h"
#include "model/lm/lm_weights.h"
#include "model/weights.h"
#include "trace/store.h"

namespace moetrace::cli {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

// The checkpoint's format and files, for both kinds of model.
void add_weight_files(const ModelChoice& m, json& j) {
  j["format"] = m.weights->format();
  j["files"] = json::array();
  for (const auto& f : m.weights->files())
    j["files"].push_back({{"path", f.string()}, {"bytes", fs::file_size(f)}});
}
void print_weight_files(const json& j) {
  std::printf("format       %s\n", j["format"].get<std::string>().c_str());
  for (const auto& f : j["files"]) {
    std::printf("file         %s (%.1f MB)\n", f["path"].get<std::string>().c_str(),
                static_cast<double>(f["bytes"].get<int64_t>()) / 1e6);
  }
}
void print_dtypes(const json& j) {
  for (auto it = j["dtypes"].begin(); it != j["dtypes"].end(); ++it) {
    std::printf("dtype        %-5s %lld parameters\n", it.key().c_str(),
                static_cast<long long>(it.value().get<int64_t>()));
  }
}

// Everything `inspect MODEL` reports, text and JSON alike.
json describe(const ModelChoice& m) {
  const SwitchConfig& c = m.config;
  json j;
  j["kind"] = "model";
  j["id"] = m.id;
  j["demo"] = m.demo;
  j["directory"] = m.demo ? json() : json(m.dir.string());
  add_weight_files(m, j);
  if (fs::exists(m.spiece)) {
    j["tokenizer"] = m.spiece.string();
  } else {
    j["tokenizer"] = nullptr;
    j["tokenizer_note"] = "no spiece.model in " + m.dir.string() +
                          "; collect needs --tokenizer FILE, e.g. the demo tokenizer " +
                          data::demo_spiece_model().string();
  }
  j["config"] = c.to_json();
  j["sparse_encoder_blocks"] = c.sparse_encoder_blocks();
  j["sparse_decoder_blocks"] = c.sparse_decoder_blocks();
  std::map<std::string, int64_t> by_dtype;
  int64_t total = 0, encoder = 0, experts = 0;
  for (const std::string& name : m.weights->names()) {
    const CheckpointTensor* t = m.weights->find(name);
    if (name == "encoder.embed_tokens.weight" || name == "decoder.embed_tokens.weight" ||
        (name == "lm_head.weight" && c.tie_word_embeddings)) {
      continue;  // aliases of shared.weight
    }
    const int64_t n = t->view.numel();
    total += n;
    by_dtype[std::string(dtype_name(t->view.dtype))] += n;
    if (name.rfind("encoder.", 0) == 0) encoder += n;
    if (name.find(".experts.") != std::string::npos) experts += n;
  }
  j["parameters"] = {{"total", total}, {"encoder", encoder}, {"experts", experts}};
  j["dtypes"] = by_dtype;
  const WeightCheck check = check_weights(c, *m.weights, !c.is_encoder_decoder);
  j["ok"] = check.problems.empty();
  j["problems"] = check.problems;
  j["warnings"] = check.warnings;
  j["unused_tensors"] = check.unused;
  j["num_tensors"] = m.weights->names().size();
  return j;
}

void print_model(const json& j, const SwitchConfig& c) {
  std::printf("model        %s%s\n", j["id"].get<std::string>().c_str(),
              j["demo"] == true ? "  (built-in demo: seeded random weights)" : "");
  if (!j["directory"].is_null())
    std::printf("directory    %s\n", j["directory"].get<std::string>().c_str());
  print_weight_files(j);
  if (j["tokenizer"].is_null()) {
    std::printf("tokenizer    none (%s)\n", j["tokenizer_note"].get<std::string>().c_str());
  } else {
    std::printf("tokenizer    %s\n", j["tokenizer"].get<std::string>().c_str());
  }
  std::printf("config       d_model %lld, d_ff %lld, heads %lld × d_kv %lld, vocab %lld\n",
              static_cast<long long>(c.d_model), static_cast<long long>(c.d_ff),
              static_cast<long long>(c.num_heads), static_cast<long long>(c.d_kv),
              static_cast<long long>(c.vocab_size));
  std::printf(
      "             %lld encoder + %lld decoder blocks, %lld experts, capacity %lld per sequence\n",
      static_cast<long long>(c.num_layers), static_cast<long long>(c.num_decoder_layers),
      static_cast<long long>(c.num_experts), static_cast<long long>(c.expert_capacity));
  auto list = [](const std::vector<int>& v) {
    std::string s;
    for (int i : v) s += (s.empty() ? "" : ", ") + std::to_string(i);
    return s;
  };
  std::printf(
      "sparse       encoder blocks [%s] (step %lld), decoder blocks [%s] (step %lld)\n",
      list(c.sparse_encoder_blocks()).c_str(), static_cast<long long>(c.encoder_sparse_step),
      list(c.sparse_decoder_blocks()).c_str(), static_cast<long long>(c.decoder_sparse_step));
  const json& p = j["parameters"];
  std::printf("parameters   %.3f B total, %.3f B encoder, %.3f B in experts\n",
              static_cast<double>(p["total"].get<int64_t>()) / 1e9,
              static_cast<double>(p["encoder"].get<int64_t>()) / 1e9,
              static_cast<double>(p["experts"].get<int64_t>()) / 1e9);
  print_dtypes(j);
  const auto& problems = j["problems"];
  if (problems.empty()) {
    std::printf("check        %zu tensors agree with config.json (shapes, dtypes)\n",
                j["num_tensors"].get<size_t>() - j["unused_tensors"].size());
  }
  constexpr size_t kShown = 20;
  for (size_t i = 0; i < problems.size() && i < kShown; ++i)
    std::printf("MISMATCH     %s\n", problems[i].get<std::string>().c_str());
  if (problems.size() > kShown)
    std::printf("MISMATCH     ... and %zu more\n", problems.size() - kShown);
  for (const auto& w : j["warnings"])
    std::printf("warning      %s\n", w.get<std::string>().c_str());
  const auto& unused = j["unused_tensors"];
  if (!unused.empty()) {
    std::printf("unused       %zu tensors this config does not use, e.g. %s\n", unused.size(),
                unused[0].get<std::string>().c_str());
  }
}

// `inspect MODEL` of a decoder-only MoE language model: its config, its tokenizer, its parameters
// and every tensor mapped as the engines map it (model/lm/lm_weights.h).
json describe_lm(const ModelChoice& m) {
  const LmConfig& c = *m.lm;
  json j;
  j["kind"] = "model";
  j["id"] = m.id;
  j["family"] = std::string(lm_family_name(c.family));
  j["directory"] = m.dir.string();
  add_weight_files(m, j);
  try {
    const auto tok = load_model_tokenizer(m, {});
    j["tokenizer"] = (m.dir / tok->files().front().name).string();
    j["tokenizer_kind"] = std::string(tok->kind());
  } catch (const Error& e) {
    j["tokenizer"] = nullptr;
    j["tokenizer_note"] = e.what();
  }
  j["summary"] = c.summary();
  j["moe_layers"] = c.sparse_layers();
  std::map<std::string, int64_t> by_dtype;
  int64_t total = 0, experts = 0;
  for (const std::string& name : m.weights->names()) {
    const CheckpointTensor* t = m.weights->find(name);
    const int64_t n = t->view.numel();
    total += n;
    by_dtype[std::string(dtype_name(t->view.dtype))] += n;
    if (name.find(".experts.") != std::string::npos) experts += n;
  }
  j["parameters"] = {{"total", total}, {"experts", experts}};
  j["dtypes"] = by_dtype;
  j["problems"] = json::array();
  try {
    j["expert_layout"] = map_lm_weights(c, *m.weights, WeightOptions{}).expert_layout;
  } catch (const Error& e) {
    j["problems"].push_back(e.what());
  }
  j["ok"] = j["problems"].empty();
  j["num_tensors"] = m.weights->names().size();
  return j;
}

void print_lm_model(const json& j) {
  std::printf("model        %s (%s)\n", j["id"].get<std::string>().c_str(),
              j["family"].get<std::string>().c_str());
  std::printf("directory    %s\n", j["directory"].get<std::string>().c_str());
  print_weight_files(j);
  if (j["tokenizer"].is_null()) {
    std::printf("tokenizer    none (%s)\n", j["tokenizer_note"].get<std::string>().c_str());
  } else {
    std::printf("tokenizer    %s (%s)\n", j["tokenizer"].get<std::string>().c_str(),
                j["tokenizer_kind"].get<std::string>().c_str());
  }
  std::printf("config       %s\n", j["summary"].get<std::string>().c_str());
  std::string layers;
  for (const auto& i : j["moe_layers"]) layers += (layers.empty() ? "" : ", ") + i.dump();
  std::printf("MoE layers   [%s]\n", layers.c_str());
  const json& p = j["parameters"];
  std::printf("parameters   %.3f B total, %.3f B in experts\n",
              static_cast<double>(p["total"].get<int64_t>()) / 1e9,
              static_cast<double>(p["experts"].get<int64_t>()) / 1e9);
  print_dtypes(j);
  if (j["problems"].empty()) {
    std::printf("check        %zu tensors agree with config.json (%s experts)\n",
                j["num_tensors"].get<size_t>(), j["expert_layout"].get<std::string>().c_str());
  }
  for (const auto& pr : j["problems"])
    std::printf("MISMATCH     %s\n", pr.get<std::string>().c_str());
}

void inspect_model(const std::string& spec, bool as_json) {
  const ModelChoice m = choose_model(spec, false);
  const json j = m.lm ? describe_lm(m) : describe(m);
  if (as_json) {
    std::cout << j.dump(2) << "\n";
  } else if (m.lm) {
    print_lm_model(j);
  } else {
    print_model(j, m.config);
  }
  std::cout.flush();
  std::fflush(stdout);
  const json& problems = j["problems"];
  if (problems.empty()) return;
  if (m.lm)  // the engines' mapping stops at the first problem
    fail(m.dir.string(), ": a tensor disagrees with config.json: ", problems[0].get<std::string>());
  fail(m.demo ? m.id : m.dir.string(), ": ", problems.size(),
       problems.size() == 1 ? " tensor disagrees" : " tensors disagree",
       " with config.json; first: ", problems[0].get<std::string>());
}

// A target that names no existing file could still be a Hub id ("org/name[@rev]") to find in the
// cache; anything else (no slash, several, ./, /, ~, a first folder that exists here) is a path.
bool looks_like_path(const std::string& t) {
  const size_t slash = t.find('/');
  if (slash == std::string::npos || slash == 0 || t.find('/', slash + 1) != std::string::npos)
    return true;
  if (t[0] == '.' || t[0] == '~' || slash + 1 == t.size()) return true;
  std::error_code ec;
  return fs::is_directory(t.substr(0, slash), ec);
}

// "routing_data/trcaes: no such trace store or model directory (routing_data holds traces,
// logs; did you mean routing_data/traces?)"
[[noreturn]] void fail_missing(const std::string& target) {
  fs::path p(target);
  std::string msg = target + ": no such trace store or model directory";
  fs::path parent = p.parent_path();
  std::error_code ec;
  if (parent.empty()) parent = ".";
  if (fs::is_directory(parent, ec)) {
    std::vector<std::string> entries;
    for (const auto& e : fs::directory_iterator(parent, ec)) {
      if (e.is_directory(ec)) entries.push_back(e.path().filename().string());
    }
    std::sort(entries.begin(), entries.end());
    const std::string near = closest_name(p.filename().string(), entries);
    if (!near.empty()) {
      msg += "; did you mean " +
             (p.parent_path().empty() ? near : (p.parent_path() / near).string()) + "?";
    } else if (!entries.empty() && entries.size() <= 8) {
      std::string list;
      for (const auto& e : entries) list += (list.empty() ? "" : ", ") + e;
      msg += " (" + parent.string() + " holds " + list + ")";
    }
  } else if (!p.parent_path().empty()) {
    msg += " (" + p.parent_path().string() + " does not exist either)";
  }
  fail(msg);
}

void run_inspect(const std::string& target, bool as_json) {
  const fs::path t = store_dir_of(target);
  std::error_code ec;
  // A directory holding a manifest.json is a store (an unparsable one says so), unless it is a
  // model directory with a manifest of its own.
  if (fs::is_directory(t, ec) && fs::exists(t / "manifest.json", ec) &&
      (!fs::exists(t / "config.json", ec) || is_trace_store(t))) {
    if (as_json) {
      std::cout << store_summary_json(t).dump(2) << "\n";
    } else {
      print_store_summary(t, std::cout);
    }
    return;
  }
  const bool builtin = target.empty() || target == "demo" || target.rfind("random:", 0) == 0;
  if (!builtin && !fs::exists(t, ec) && looks_like_path(target)) {
    try {
      resolve_model(target);  // a Hub id whose org happens to be a local folder name
    } catch (const Error&) {
      fail_missing(target);
    }
  }
  inspect_model(target, as_json);
}

const RegisterCommand reg([](CLI::App& app) {
  auto target = std::make_shared<std::string>();
  auto as_json = std::make_shared<bool>(false);
  CLI::App* sub = app.add_subcommand(
      "inspect",
      "Describe a model (directory, Hub id, 'demo' or 'random:switch-base-N') or a trace store");
  sub->add_option("target", *target,
                  "model directory, Hub id, 'demo', 'random:switch-base-N', or trace store "
                  "directory (or its manifest.json)")
      ->required();
  sub->add_flag("--json", *as_json, "print the description as JSON (keys: docs/TRACE_FORMAT.md)");
  sub->callback([target, as_json] { run_inspect(*target, *as_json); });
});

}  // namespace
}  // namespace moetrace::cli
