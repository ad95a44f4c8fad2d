// Seeded random Switch weights held in memory, under the checkpoint's tensor names: the built-in
// demo model and the benchmarks (switch-base-8/128 shapes without a download). Every tensor is
// generated from (seed, name), so the result does not depend on thread count or generation order.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string_view>

#include "io/checkpoint.h"
#include "model/config.h"

namespace moetrace {

struct RandomWeightOptions {
  uint64_t seed = 0;
  DType dtype = DType::kF32;  // F32, F16 or BF16
  bool encoder_only = false;  // skip the decoder's tensors
};

std::shared_ptr<TensorSource> make_random_weights(const SwitchConfig& config,
                                                  const RandomWeightOptions& options);

// Configs of the published models (shapes only) and of the built-in demo model.
SwitchConfig switch_base_config(int64_t num_experts);   // google/switch-base-{8..256}
SwitchConfig switch_large_config(int64_t num_experts);  // google/switch-large-128: d 1024, 24+24
// "switch-base-N" / "switch-large-N" (N experts, 1..4096) -> that shape; nullopt for other names.
std::optional<SwitchConfig> published_config(std::string_view name);
SwitchConfig demo_config();  // switch-base layout scaled down: d 64, 12+12 layers, 8 experts
constexpr uint64_t kDemoSeed = 20261126;

}  // namespace moetrace
