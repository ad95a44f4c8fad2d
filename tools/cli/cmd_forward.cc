// moetrace forward --model M --inputs IN.safetensors --output OUT.safetensors [--generate N]
#include "command.h"
#include "core/log.h"
#include "io/hf_cache.h"
#include "io/safetensors.h"
#include "kernels/cpu/ops.h"
#include "model/forward.h"

namespace moetrace::cli {
namespace {

struct ForwardOptions {
  std::string model;
  std::string inputs;
  std::string output;
  int64_t generate = 0;
  int threads = 0;
};

void run(const ForwardOptions& o) {
  cpu::set_num_threads(o.threads);
  ForwardInputs in = read_forward_inputs(o.inputs);
  LoadOptions lo;
  lo.encoder_only = in.T == 0 && o.generate == 0;
  auto model = SwitchModel::load(resolve_model(o.model).dir, lo);
  std::map<std::string, Tensor> out = run_forward(*model, in, o.generate);
  std::vector<NamedView> views;
  for (const auto& [name, t] : out) views.push_back({name, t.view()});
  const std::filesystem::path path(o.output);
  const std::filesystem::path tmp = path.string() + ".tmp";
  write_safetensors(tmp, views, {{"producer", "moetrace forward"}});
  std::filesystem::rename(tmp, path);
  log_info("wrote ", out.size(), " tensors to ", o.output);
}

const RegisterCommand reg([](CLI::App& app) {
  auto opts = std::make_shared<ForwardOptions>();
  CLI::App* sub = app.add_subcommand(
      "forward", "Run the model on given ids; outputs named like the fixtures' reference");
  sub->add_option("--model,-m", opts->model, "model directory or Hub id (resolved offline)")
      ->required();
  sub->add_option("--inputs", opts->inputs,
                  "safetensors with input_ids, attention_mask [, decoder_input_ids]")
      ->required();
  sub->add_option("--output,-o", opts->output, "output safetensors")->required();
  sub->add_option("--generate", opts->generate, "greedy-generate exactly N tokens (eos masked)")
      ->capture_default_str();
  sub->add_option("--threads", opts->threads, "CPU threads (0 = all cores)")->capture_default_str();
  sub->callback([opts] { run(*opts); });
});

}  // namespace
}  // namespace moetrace::cli
