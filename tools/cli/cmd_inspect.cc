// moetrace inspect M|STORE: a model's resolved files, config, sparse blocks, parameters and dtypes;
// or a trace store's summary.
#include <cstdio>
#include <iostream>
#include <map>

#include "collect/model_source.h"
#include "command.h"
#include "model/config.h"
#include "trace/store.h"

namespace moetrace::cli {
namespace {

void inspect_model(const std::string& spec) {
  const ModelChoice m = choose_model(spec, false);
  std::printf("model        %s%s\n", m.id.c_str(),
              m.demo ? "  (built-in demo: seeded random weights)" : "");
  if (!m.demo) std::printf("directory    %s\n", m.dir.string().c_str());
  std::printf("format       %s\n", m.weights->format().c_str());
  for (const auto& f : m.weights->files()) {
    std::printf("file         %s (%.1f MB)\n", f.string().c_str(),
                static_cast<double>(std::filesystem::file_size(f)) / 1e6);
  }
  std::printf("tokenizer    %s\n", m.spiece.string().c_str());
  const SwitchConfig& c = m.config;
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
  std::printf("parameters   %.3f B total, %.3f B encoder, %.3f B in experts\n",
              static_cast<double>(total) / 1e9, static_cast<double>(encoder) / 1e9,
              static_cast<double>(experts) / 1e9);
  for (const auto& [dt, n] : by_dtype)
    std::printf("dtype        %-5s %lld parameters\n", dt.c_str(), static_cast<long long>(n));
}

const RegisterCommand reg([](CLI::App& app) {
  auto target = std::make_shared<std::string>();
  CLI::App* sub = app.add_subcommand(
      "inspect", "Describe a model (directory, Hub id or 'demo') or a trace store");
  sub->add_option("target", *target, "model directory, Hub id, 'demo', or trace store directory")
      ->required();
  sub->callback([target] {
    if (is_trace_store(*target)) {
      print_store_summary(*target, std::cout);
    } else {
      inspect_model(*target);
    }
  });
});

}  // namespace
}  // namespace moetrace::cli
