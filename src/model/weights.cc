#include "model/weights.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <set>

#include "core/error.h"
#include "core/log.h"

namespace moetrace {

const float* Matrix::get(std::vector<float>& scratch) const {
  if (!f32.empty()) return f32.data();
  if (dtype == DType::kF32) return static_cast<const float*>(raw);
  scratch.resize(static_cast<size_t>(rows * cols));
  convert_to_f32(dtype, raw, scratch.data(), scratch.size());
  return scratch.data();
}

void Matrix::materialize() {
  if (!f32.empty() || rows * cols == 0) return;
  f32.resize(static_cast<size_t>(rows * cols));
  convert_to_f32(dtype, raw, f32.data(), f32.size());
}

namespace {

// Walks the tensors a config implies (map_block() and map_weights() name each with its shape).
// Loading: each is checked and converted, the first problem throws. Checking (`problems` given):
// nothing is read or converted, every problem is collected and the walk goes on.
}  // namespace

int64_t count_non_finite(const TensorView& v) {
  const auto n = static_cast<size_t>(v.numel());
  int64_t bad = 0;
  std::vector<float> buf;
  constexpr size_t kChunk = 1 << 16;
  for (size_t i = 0; i < n; i += kChunk) {
    const size_t m = std::min(kChunk, n - i);
    buf.resize(m);
    convert_to_f32(v.dtype, static_cast<const uint8_t*>(v.data) + i * dtype_size(v.dtype),
                   buf.data(), m);
    for (float x : buf) bad += std::isfinite(x) ? 0 : 1;
  }
  return bad;
}

namespace {

class Mapper {
 public:
  Mapper(const SwitchConfig& c, const TensorSource& s, std::vector<std::string>* problems = nullptr)
      : c_(c), s_(s), problems_(problems) {}

  bool checking() const { return problems_ != nullptr; }

  const CheckpointTensor& tensor(const std::string& name, const Shape& shape) const {
    const CheckpointTensor* t = s_.find(name);
    std::string problem;
    if (t == nullptr) {
      const auto files = s_.files();
      problem = (files.empty() ? std::string("checkpoint") : files.front().string()) +
                ": tensor '" + name + "' is missing (expected shape " + shape_str(shape) +
                " for this config.json)";
    } else if (t->view.shape != shape) {
      problem = t->file.string() + ": tensor '" + name + "' has shape " + shape_str(t->view.shape) +
                " but config.json implies " + shape_str(shape);
    } else if (t->view.dtype != DType::kF32 && t->view.dtype != DType::kF16 &&
               t->view.dtype != DType::kBF16) {
      problem = t->file.string() + ": tensor '" + name + "' has dtype " +
                std::string(dtype_name(t->view.dtype)) + " (expected F32, F16 or BF16)";
    }
    if (!checking()) {
      if (!problem.empty()) fail(problem);
      return *t;
    }
    visited_.push_back(name);
    if (!problem.empty()) problems_->push_back(problem);
    return placeholder_;
  }

  Matrix matrix(const std::string& name, int64_t rows, int64_t cols, bool to_f32) const {
    const CheckpointTensor& t = tensor(name, {rows, cols});
    Matrix m{rows, cols, t.view.dtype, t.view.data, {}};
    if (to_f32 && !checking()) m.materialize();
    return m;
  }

  std::vector<float> vec(const std::string& name, Shape shape) const {
    const CheckpointTensor& t = tensor(name, shape);
    if (checking()) return {};
    std::vector<float> out(static_cast<size_t>(shape_numel(shape)));
    convert_to_f32(t.view.dtype, t.view.data, out.data(), out.size());
    return out;
  }

  // Stacks several [r_i, cols] matrices into one f32 [sum r_i, cols].
  Matrix stacked(const std::vector<std::string>& names, int64_t rows_each, int64_t cols) const {
    Matrix m;
    m.rows = rows_each * static_cast<int64_t>(names.size());
    m.cols = cols;
    if (!checking()) m.f32.resize(static_cast<size_t>(m.rows * cols));
    for (size_t i = 0; i < names.size(); ++i) {
      const CheckpointTensor& t = tensor(names[i], {rows_each, cols});
      if (checking()) continue;
      convert_to_f32(t.view.dtype, t.view.data, m.f32.data() + i * rows_each * cols,
                     static_cast<size_t>(rows_each * cols));
    }
    return m;
  }

  // The shared embedding under any of its names.
  const CheckpointTensor& embedding() const {
    const CheckpointTensor* found = nullptr;
    for (const char* name :
         {"shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight"}) {
      if (s_.find(name) == nullptr) continue;
      const CheckpointTensor& t = tensor(name, {c_.vocab_size, c_.d_model});
      if (!checking()) return t;
      found = &t;  // checking: every alias present is checked
    }
    if (found != nullptr) return *found;
    return tensor("shared.weight", {c_.vocab_size, c_.d_model});  // missing
  }

  // Router weights decide every token's expert: a NaN or Inf there silently sends tokens to expert
  // 0 (argmax of NaN rows), so it is reported once per tensor: a warning when loading, a line of
  // `warnings` when checking.
  void check_finite(const std::string& name) const {
    const CheckpointTensor* t = s_.find(name);
    if (t == nullptr || t->view.data == nullptr) return;
    if (t->view.dtype != DType::kF32 && t->view.dtype != DType::kF16 &&
        t->view.dtype != DType::kBF16) {
      return;
    }
    const int64_t bad = count_non_finite(t->view);
    if (bad == 0) return;
    const std::string msg = t->file.string() + ": router tensor '" + name + "' has " +
                            std::to_string(bad) + " NaN/Inf value" + (bad == 1 ? "" : "s") +
                            " of " + std::to_string(t->view.numel()) +
                            "; routing through it is meaningless (tokens go to expert 0)";
    if (warnings_ != nullptr) {
      warnings_->push_back(msg);
    } else {
      log_warn(msg);
    }
  }
  void set_warnings(std::vector<std::string>* w) { warnings_ = w; }

  // Names tensor() was asked for (checking only).
  const std::vector<std::string>& visited() const { return visited_; }

 private:
  const SwitchConfig& c_;
  const TensorSource& s_;
  std::vector<std::string>* problems_;
  std::vector<std::string>* warnings_ = nullptr;
  mutable std::vector<std::string> visited_;
  const CheckpointTensor placeholder_{};
};

Block map_block(const Mapper& m, const SwitchConfig& c, const std::string& stack, int64_t i,
                bool decoder, bool sparse, size_t* expert_bytes) {
  const int64_t d = c.d_model, inner = c.num_heads * c.d_kv;
  const std::string p = stack + ".block." + std::to_string(i) + ".layer.";
  Block b;
  b.ln_attn = m.vec(p + "0.layer_norm.weight", {d});
  b.self_attn.qkv = m.stacked({p + "0.SelfAttention.q.weight", p + "0.SelfAttention.k.weight",
                               p + "0.SelfAttention.v.weight"},
                              inner, d);
  b.self_attn.o = m.matrix(p + "0.SelfAttention.o.weight", d, inner, true);
  std::string ff = p + "1.";
  if (decoder) {
    b.ln_cross = m.vec(p + "1.layer_norm.weight", {d});
    b.cross_attn.q = m.matrix(p + "1.EncDecAttention.q.weight", inner, d, true);
    b.cross_attn.kv =
        m.stacked({p + "1.EncDecAttention.k.weight", p + "1.EncDecAttention.v.weight"}, inner, d);
    b.cross_attn.o = m.matrix(p + "1.EncDecAttention.o.weight", d, inner, true);
    ff = p + "2.";
  }
  b.ln_ff = m.vec(ff + "layer_norm.weight", {d});
  b.sparse = sparse;
  if (!sparse) {
    b.dense.wi = m.matrix(ff + "mlp.wi.weight", c.d_ff, d, true);
    b.dense.wo = m.matrix(ff + "mlp.wo.weight", d, c.d_ff, true);
    return b;
  }
  b.moe.router = m.matrix(ff + "mlp.router.classifier.weight", c.num_experts, d, true);
  m.check_finite(ff + "mlp.router.classifier.weight");
  if (c.router_bias) {
    b.moe.bias = m.vec(ff + "mlp.router.classifier.bias", {c.num_experts});
    m.check_finite(ff + "mlp.router.classifier.bias");
  }
  for (int64_t e = 0; e < c.num_experts; ++e) {
    const std::string ep = ff + "mlp.experts.expert_" + std::to_string(e) + ".";
    Expert ex{m.matrix(ep + "wi.weight", c.d_ff, d, false),
              m.matrix(ep + "wo.weight", d, c.d_ff, false)};
    *expert_bytes += ex.wi.f32_bytes() + ex.wo.f32_bytes();
    b.moe.experts.push_back(std::move(ex));
  }
  return b;
}

}  // namespace

namespace {

// The walk of map_weights(), shared by loading and checking; *expert_bytes gets the f32 size of
// all experts.
SwitchWeights walk_weights(const SwitchConfig& c, const Mapper& m, const WeightOptions& options,
                           size_t* expert_bytes) {
  SwitchWeights w;
  const CheckpointTensor& emb = m.embedding();
  w.embed = Matrix{c.vocab_size, c.d_model, emb.view.dtype, emb.view.data, {}};
  const int64_t nb = c.relative_attention_num_buckets, H = c.num_heads;
  w.enc_rel_bias =
      m.vec("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", {nb, H});
  for (int64_t i = 0; i < c.num_layers; ++i) {
    w.encoder.push_back(
        map_block(m, c, "encoder", i, false, c.encoder_block_sparse(i), expert_bytes));
  }
  w.enc_final_ln = m.vec("encoder.final_layer_norm.weight", {c.d_model});
  w.has_decoder = !options.encoder_only;
  if (w.has_decoder) {
    w.dec_rel_bias =
        m.vec("decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", {nb, H});
    for (int64_t i = 0; i < c.num_decoder_layers; ++i) {
      w.decoder.push_back(
          map_block(m, c, "decoder", i, true, c.decoder_block_sparse(i), expert_bytes));
    }
    w.dec_final_ln = m.vec("decoder.final_layer_norm.weight", {c.d_model});
    if (c.tie_word_embeddings) {
      w.lm_head = w.embed;
    } else {
      w.lm_head = m.matrix("lm_head.weight", c.vocab_size, c.d_model, false);
    }
  }
  return w;
}

}  // namespace

SwitchWeights map_weights(const SwitchConfig& c, const TensorSource& source,
                          const WeightOptions& options) {
  Mapper m(c, source);
  size_t expert_bytes = 0;
  SwitchWeights w = walk_weights(c, m, options, &expert_bytes);
  if (expert_bytes <= options.f32_expert_budget_bytes) {
    for (auto* stack : {&w.encoder, &w.decoder}) {
      for (Block& b : *stack) {
        for (Expert& e : b.moe.experts) {
          e.wi.materialize();
          e.wo.materialize();
        }
      }
    }
  }
  return w;
}

WeightCheck check_weights(const SwitchConfig& c, const TensorSource& source, bool encoder_only) {
  WeightCheck out;
  Mapper m(c, source, &out.problems);
  m.set_warnings(&out.warnings);
  WeightOptions options;
  options.encoder_only = encoder_only;
  size_t expert_bytes = 0;
  walk_weights(c, m, options, &expert_bytes);
  std::set<std::string> used(m.visited().begin(), m.visited().end());
  if (c.tie_word_embeddings) used.insert("lm_head.weight");  // an alias of shared.weight
  for (const std::string& name : source.names()) {
    if (used.count(name) != 0) continue;
    // Decoder tensors are expected by an encoder-only walk's checkpoint too.
    if (encoder_only && (name.rfind("decoder.", 0) == 0 || name == "lm_head.weight")) continue;
    out.unused.push_back(name);
  }
  return out;
}

}  // namespace moetrace
