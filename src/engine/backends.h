// The engines make_engine() chooses from (engine.cc), one per device.
#pragma once

#include <memory>
#include <string>

#include "engine/engine.h"

namespace moetrace {

// Only in a build with the CUDA backend (cuda_engine.cc).
std::unique_ptr<Engine> make_cuda_engine(const EngineOptions& options, const SwitchConfig& config,
                                         std::shared_ptr<TensorSource> weights);
std::unique_ptr<Engine> make_cuda_lm_engine(const EngineOptions& options,
                                            const std::filesystem::path& dir);
std::map<std::string, Tensor> cuda_lm_forward(const EngineOptions& options,
                                              const std::filesystem::path& dir,
                                              const ForwardInputs& in, int64_t generate);

// "fp32", "bf16", "fp16": the spelling of --precision.
std::string precision_name(DType precision);

}  // namespace moetrace
