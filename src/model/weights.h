// The Switch checkpoint mapped onto typed per-block structs, every shape checked against the
// config. Dense weights are float32 copies; expert weights stay in the checkpoint's dtype
// (memory-mapped) and are converted when used unless the whole set fits the f32 cache budget.
#pragma once

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "io/checkpoint.h"
#include "model/config.h"

namespace moetrace {

// A [rows, cols] matrix in PyTorch Linear layout [out, in].
struct Matrix {
  int64_t rows = 0, cols = 0;
  DType dtype = DType::kF32;
  const void* raw = nullptr;  // checkpoint bytes (mapped), may be non-f32
  std::vector<float> f32;     // converted copy; empty when not materialised

  // Returns float32 data: the copy, the raw bytes when they are f32, or `scratch` filled by
  // conversion.
  const float* get(std::vector<float>& scratch) const;
  void materialize();
  size_t f32_bytes() const { return static_cast<size_t>(rows * cols) * 4; }
};

struct Expert {
  Matrix wi;  // [d_ff, d]
  Matrix wo;  // [d, d_ff]
};

struct SparseMLP {
  Matrix router;            // [E, d], always f32
  std::vector<float> bias;  // [E] or empty
  std::vector<Expert> experts;
};

struct DenseMLP {
  Matrix wi;  // [d_ff, d]
  Matrix wo;  // [d, d_ff]
};

struct Attention {
  Matrix qkv;    // [3*H*dk, d]: q, k, v stacked (one GEMM)
  Matrix o;      // [d, H*dk]
  Matrix q, kv;  // decoder cross-attention splits: q [H*dk, d], kv [2*H*dk, d]
};

struct Block {
  std::vector<float> ln_attn;  // [d]
  Attention self_attn;
  std::vector<float> ln_cross;  // decoder only
  Attention cross_attn;         // decoder only
  std::vector<float> ln_ff;     // [d]
  bool sparse = false;
  DenseMLP dense;
  SparseMLP moe;
};

struct SwitchWeights {
  Matrix embed;                     // [V, d] (shared.weight), kept in its dtype
  std::vector<float> enc_rel_bias;  // [num_buckets, H]
  std::vector<Block> encoder;
  std::vector<float> enc_final_ln;
  std::vector<float> dec_rel_bias;
  std::vector<Block> decoder;
  std::vector<float> dec_final_ln;
  Matrix lm_head;  // [V, d]; aliases embed when tied
  bool has_decoder = false;
};

struct WeightOptions {
  bool encoder_only = false;
  // Expert weights are converted to f32 at load when their f32 size stays under this budget;
  // otherwise each expert is converted when a batch uses it.
  size_t f32_expert_budget_bytes = size_t{4} << 30;
};

// Maps the source's tensors (names per SWITCH_SPEC.md, aliases for the embedding resolved) and
// checks every shape; Error names the tensor and file on a mismatch or a missing tensor. Router
// weights holding NaN/Inf are logged as one warning per tensor.
SwitchWeights map_weights(const SwitchConfig& config, const TensorSource& source,
                          const WeightOptions& options);

// Values of an F32, F16 or BF16 tensor that are NaN or +-Inf.
int64_t count_non_finite(const TensorView& v);

// map_weights()'s checks without loading anything: every tensor the config implies, present, of
// that shape and of dtype F32, F16 or BF16. `problems`: one line per tensor (missing, wrong shape,
// wrong dtype) naming the file and tensor, as map_weights() would throw them; `unused`: checkpoint
// tensors the config does not use (e.g. the decoder of an encoder-only walk is not listed);
// `warnings`: router tensors holding NaN/Inf (map_weights() logs these as warnings and goes on).
struct WeightCheck {
  std::vector<std::string> problems;
  std::vector<std::string> unused;
  std::vector<std::string> warnings;
};
WeightCheck check_weights(const SwitchConfig& config, const TensorSource& source,
                          bool encoder_only);

}  // namespace moetrace
