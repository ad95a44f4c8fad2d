// Random Switch weights at the scales transformers initializes a SwitchTransformers model with
// (_init_weights, factor 1): attention q std (d·d_kv)^-1/2, k/v std d^-1/2, o std (H·d_kv)^-1/2,
// relative bias std d^-1/2. Built over make_random_weights (model/random_weights.h, every tensor at
// std 1/sqrt(fan_in), relative bias std 1) by rescaling q and the relative bias: with unscaled T5
// attention, q at 1/sqrt(d) makes scores ~8x sharper than any trained or HF-initialised model, and
// a model that chaotic amplifies any rounding difference layer by layer. The bf16-vs-fp32 parity
// numbers and the HF baseline both use these scales.
#pragma once

#include <memory>

#include "io/checkpoint.h"
#include "model/config.h"
#include "model/random_weights.h"

namespace moetrace {

std::shared_ptr<TensorSource> make_hf_init_random_weights(const SwitchConfig& config,
                                                          const RandomWeightOptions& options);

}  // namespace moetrace
