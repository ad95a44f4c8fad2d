// `moetrace routers --model M -o OUT.safetensors`: extracts every sparse block's router weights
// as float32 so that Python (moetrace speculate's `pregate` predictor) can apply the next layer's
// router to the current layer's hidden state without reading a checkpoint itself.
//
// Output tensors (float32): `enc.{i}.router.weight` [E, d_model] for each sparse encoder block i,
// `enc.{i}.router.bias` [E] when the config has router_bias, and the same for `dec.{i}`.
// __metadata__: format "moetrace-routers", num_experts, d_model, model (the directory, or the
// built-in model's id: "moetrace-demo", "random:switch-base-N").
#include <filesystem>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "collect/model_source.h"
#include "command.h"
#include "core/error.h"
#include "core/keys.h"
#include "core/log.h"
#include "core/tensor.h"
#include "io/checkpoint.h"
#include "io/safetensors.h"
#include "model/config.h"
#include "model/weights.h"

namespace moetrace::cli {
namespace {

namespace fs = std::filesystem;

struct RoutersOptions {
  std::string model_dir;
  std::string output;
};

// The checkpoint name of block `block`'s router classifier in stack `stack` ("encoder"/"decoder"):
// `{stack}.block.{i}.layer.{j}.mlp.router.classifier.{what}`, j being 1 in the encoder and 2 in the
// decoder; found by pattern so a layout with another j still works. nullptr when absent.
const CheckpointTensor* find_router(const TensorSource& src, const std::string& stack, int block,
                                    const std::string& what) {
  const std::string prefix = stack + ".block." + std::to_string(block) + ".layer.";
  const std::string suffix = ".mlp.router.classifier." + what;
  for (const auto& name : src.names()) {
    if (name.size() > prefix.size() + suffix.size() &&
        name.compare(0, prefix.size(), prefix) == 0 &&
        name.compare(name.size() - suffix.size(), suffix.size(), suffix) == 0) {
      return src.find(name);
    }
  }
  return nullptr;
}

Tensor to_f32(const CheckpointTensor& t) {
  Tensor out(DType::kF32, t.view.shape);
  convert_to_f32(t.view.dtype, t.view.data, out.data<float>(), static_cast<size_t>(t.view.numel()));
  return out;
}

// A router with NaN/Inf sends every token to expert 0: said once per tensor.
void warn_non_finite(const CheckpointTensor& t) {
  const int64_t bad = count_non_finite(t.view);
  if (bad > 0) {
    log_warn(t.file.string(), ": router tensor '", t.name, "' has ", bad, " NaN/Inf value",
             bad == 1 ? "" : "s", " of ", t.view.numel(),
             "; routing through it is meaningless (tokens go to expert 0)");
  }
}

void run_routers(const RoutersOptions& opt) {
  // The same --model as collect: a directory, a Hub id, "demo" or "random:switch-base-N".
  const ModelChoice model = choose_model(opt.model_dir, false);
  if (model.lm)
    fail("routers: ", model.id, " is a decoder-only language model (",
         lm_family_name(model.lm->family),
         "); `moetrace routers` exports Switch routers (speculate's router-based predictors are "
         "for Switch stores)");
  const SwitchConfig& cfg = model.config;
  const TensorSource* src = model.weights.get();
  const std::string dir = model.demo ? model.id : model.dir.string();
  std::vector<Tensor> owned;  // keeps the converted data alive until written
  std::vector<std::pair<std::string, size_t>> names;
  auto add_stack = [&](const std::string& stack, keys::Stack s, const std::vector<int>& blocks) {
    for (int i : blocks) {
      const CheckpointTensor* w = find_router(*src, stack, i, "weight");
      if (w == nullptr) {
        fail(dir, ": no router weight `", stack, ".block.", i,
             ".layer.*.mlp.router.classifier.weight` for sparse block ", i);
      }
      if (w->view.shape != Shape{cfg.num_experts, cfg.d_model}) {
        fail(w->file.string(), ": tensor '", w->name, "' has shape ", shape_str(w->view.shape),
             ", expected [", cfg.num_experts, ", ", cfg.d_model, "]");
      }
      warn_non_finite(*w);
      owned.push_back(to_f32(*w));
      names.emplace_back(keys::layer(s, i) + ".router.weight", owned.size() - 1);
      if (cfg.router_bias) {
        const CheckpointTensor* b = find_router(*src, stack, i, "bias");
        if (b == nullptr) {
          fail(dir, ": config has router_bias but `", stack, ".block.", i,
               ".layer.*.mlp.router.classifier.bias` is missing");
        }
        if (b->view.shape != Shape{cfg.num_experts}) {
          fail(b->file.string(), ": tensor '", b->name, "' has shape ", shape_str(b->view.shape),
               ", expected [", cfg.num_experts, "]");
        }
        warn_non_finite(*b);
        owned.push_back(to_f32(*b));
        names.emplace_back(keys::layer(s, i) + ".router.bias", owned.size() - 1);
      }
    }
  };
  add_stack("encoder", keys::Stack::kEncoder, cfg.sparse_encoder_blocks());
  if (cfg.is_encoder_decoder)
    add_stack("decoder", keys::Stack::kDecoder, cfg.sparse_decoder_blocks());
  std::vector<NamedView> views;
  for (const auto& [name, k] : names) views.push_back(NamedView{name, owned[k].view()});
  const std::map<std::string, std::string> meta = {
      {"format", "moetrace-routers"},
      {"num_experts", std::to_string(cfg.num_experts)},
      {"d_model", std::to_string(cfg.d_model)},
      {"model", model.demo ? model.id : fs::absolute(model.dir).string()},
  };
  const fs::path out = opt.output;
  const fs::path tmp = out.parent_path() / (".tmp-" + out.filename().string());
  write_safetensors(tmp, views, meta);
  fs::rename(tmp, out);
  log_info("routers: wrote ", views.size(), " tensors to ", out.string());
}

RegisterCommand reg([](CLI::App& app) {
  auto opt = std::make_shared<RoutersOptions>();
  auto* sub = app.add_subcommand(
      "routers",
      "Write each sparse block's router weights (float32) to a safetensors file (for `moetrace "
      "speculate --routers`)");
  sub->add_option("--model,-m", opt->model_dir,
                  "model directory, Hub id (offline, from the HF cache), 'demo' or "
                  "'random:switch-base-N' (as collect's --model)")
      ->required();
  sub->add_option("-o,--output", opt->output, "output .safetensors file")->required();
  sub->callback([opt] { run_routers(*opt); });
});

}  // namespace
}  // namespace moetrace::cli
