// moetrace forward --model M --inputs IN.safetensors --output OUT.safetensors [--generate N]
//                  [--device cpu|cuda|cuda:N|auto] [--precision fp32|bf16|fp16|mixed]
#include "command.h"
#include "core/dtype.h"
#include "core/error.h"
#include "core/log.h"
#include "engine/engine.h"
#include "io/checkpoint.h"
#include "io/hf_cache.h"
#include "io/safetensors.h"
#include "kernels/cpu/ops.h"
#include "model/config.h"
#include "model/forward.h"
#include "model/lm/lm_config.h"

namespace moetrace::cli {
namespace {

struct ForwardOptions {
  std::string model;
  std::string inputs;
  std::string output;
  int64_t generate = 0;
  int threads = 0;
  std::string device = "cpu";
  std::string precision = "fp32";
};

void write_outputs(const std::map<std::string, Tensor>& out, const std::string& output,
                   const std::string& device) {
  std::vector<NamedView> views;
  for (const auto& [name, t] : out) views.push_back({name, t.view()});
  const std::filesystem::path path(output);
  const std::filesystem::path tmp = path.string() + ".tmp";
  write_safetensors(tmp, views, {{"producer", "moetrace forward"}});
  std::filesystem::rename(tmp, path);
  log_info("wrote ", out.size(), " tensors to ", output, " (", device, ")");
}

void run(const ForwardOptions& o) {
  cpu::set_num_threads(o.threads);
  ForwardInputs in = read_forward_inputs(o.inputs);
  const std::filesystem::path dir = resolve_model(o.model).dir;
  EngineOptions eo;
  eo.device = resolve_device(o.device, 0);
  const std::string precision = parse_precision_option("--precision", o.precision);
  const PrecisionMode pm = precision_mode(precision);
  eo.precision = pm.operands;
  eo.fp32_routing = pm.fp32_routing;
  eo.attention_pairs = pm.attention_pairs;
  if (!eo.device.cuda && pm.beyond_operands()) {
    log_info("--precision ", precision, ": the CPU engine computes everything in fp32, so ",
             precision, " is fp32");
    eo.precision = DType::kF32;
    eo.fp32_routing = false;
    eo.attention_pairs = false;
  }
  LmFamily family;
  if (parse_lm_family(read_model_type(dir / "config.json"), &family)) {
    // A decoder-only MoE language model (olmoe, mixtral, qwen2_moe, qwen3_moe).
    write_outputs(lm_forward(eo, dir, in, o.generate), o.output, eo.device.name());
    return;
  }
  eo.load.encoder_only = in.T == 0 && o.generate == 0;
  const SwitchConfig config = load_config(dir / "config.json");
  auto engine = make_engine(eo, config, open_checkpoint(dir));
  write_outputs(run_forward(*engine, config, in, o.generate), o.output, engine->device());
}

const RegisterCommand reg([](CLI::App& app) {
  auto opts = std::make_shared<ForwardOptions>();
  CLI::App* sub = app.add_subcommand(
      "forward", "Run the model on given ids; outputs named like the fixtures' reference");
  sub->add_option(
         "--model,-m", opts->model,
         "model directory or Hub id (resolved offline); a Switch model or a MoE language model "
         "(olmoe, mixtral, qwen2_moe, qwen3_moe)")
      ->required();
  sub->add_option("--inputs", opts->inputs,
                  "safetensors with input_ids, attention_mask [, decoder_input_ids]")
      ->required();
  sub->add_option("--output,-o", opts->output, "output safetensors")->required();
  sub->add_option("--generate", opts->generate, "greedy-generate exactly N tokens (eos masked)")
      ->capture_default_str();
  sub->add_option("--threads", opts->threads, "CPU threads (0 = all cores)")->capture_default_str();
  sub->add_option("--device", opts->device,
                  "cpu | cuda | cuda:N | auto: the engine (auto: the GPU when built with CUDA and "
                  "one is visible, else the CPU)")
      ->capture_default_str();
  sub->add_option("--precision", opts->precision,
                  "fp32 | bf16 | fp16 | mixed | faithful: the GPU engine's GEMM operands (router "
                  "always fp32; mixed: fp16 operands, top-1 and gate from fp32 probabilities; "
                  "faithful: mixed with the encoder attention in fp16 pairs); the CPU computes in "
                  "fp32 only")
      ->capture_default_str();
  sub->callback([opts] { run(*opts); });
});

}  // namespace
}  // namespace moetrace::cli
