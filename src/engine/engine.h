// make_engine(): the engine of a device, the one place that knows which engines this build has
// (model/engine.h is the interface both implement). collect, forward and the CLI see only this.
//
//   auto engine = make_engine({resolve_device("auto", 0), DType::kBF16, load}, config, weights);
#pragma once

#include <filesystem>
#include <map>
#include <memory>
#include <string>

#include "core/dtype.h"
#include "engine/device.h"
#include "io/checkpoint.h"
#include "model/config.h"
#include "model/engine.h"
#include "model/forward.h"
#include "model/switch_model.h"

namespace moetrace {

struct EngineOptions {
  DeviceChoice device;            // resolve_device()'s
  DType precision = DType::kF32;  // cpu: F32 only; cuda: BF16, F16 or F32
  LoadOptions load;
  bool fp32_routing = false;     // cuda: top-1 and gate from fp32 probabilities (--precision mixed)
  bool attention_pairs = false;  // cuda: encoder attention in operand pairs (--precision faithful)
};

// The engine of `options.device`, its weights loaded from `weights` (materialised or uploaded
// once). Error when the device is not usable or the model not supported there.
std::unique_ptr<Engine> make_engine(const EngineOptions& options, const SwitchConfig& config,
                                    std::shared_ptr<TensorSource> weights);

// `moetrace forward` of a decoder-only MoE language model in `dir` on options.device: the outputs
// of run_lm_forward (model/lm/lm_forward.h) from LmModel (CPU, fp32) or CudaLmModel (GPU,
// options.precision).
std::map<std::string, Tensor> lm_forward(const EngineOptions& options,
                                         const std::filesystem::path& dir, const ForwardInputs& in,
                                         int64_t generate);

// The same for a decoder-only MoE language model (model/lm: olmoe, mixtral, qwen2_moe, qwen3_moe)
// in `dir` (config.json, generation_config.json, the checkpoint): LmModel on the CPU (fp32),
// CudaLmModel on a GPU (options.precision; options.load and fp32_routing do not apply: the router
// is fp32 in every precision).
std::unique_ptr<Engine> make_lm_engine(const EngineOptions& options,
                                       const std::filesystem::path& dir);

}  // namespace moetrace
