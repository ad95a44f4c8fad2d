#include "model/weights.h"

#include <cstring>

#include "core/error.h"

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

class Mapper {
 public:
  Mapper(const SwitchConfig& c, const TensorSource& s) : c_(c), s_(s) {}

  const CheckpointTensor& tensor(const std::string& name, const Shape& shape) const {
    const CheckpointTensor* t = s_.find(name);
    if (t == nullptr) {
      const auto files = s_.files();
      fail(files.empty() ? std::string("checkpoint") : files.front().string(), ": tensor '", name,
           "' is missing (expected shape ", shape_str(shape), " for this config.json)");
    }
    if (t->view.shape != shape) {
      fail(t->file.string(), ": tensor '", name, "' has shape ", shape_str(t->view.shape),
           " but config.json implies ", shape_str(shape));
    }
    if (t->view.dtype != DType::kF32 && t->view.dtype != DType::kF16 &&
        t->view.dtype != DType::kBF16) {
      fail(t->file.string(), ": tensor '", name, "' has dtype ", dtype_name(t->view.dtype),
           " (expected F32, F16 or BF16)");
    }
    return *t;
  }

  Matrix matrix(const std::string& name, int64_t rows, int64_t cols, bool to_f32) const {
    const CheckpointTensor& t = tensor(name, {rows, cols});
    Matrix m{rows, cols, t.view.dtype, t.view.data, {}};
    if (to_f32) m.materialize();
    return m;
  }

  std::vector<float> vec(const std::string& name, Shape shape) const {
    const CheckpointTensor& t = tensor(name, shape);
    std::vector<float> out(static_cast<size_t>(shape_numel(shape)));
    convert_to_f32(t.view.dtype, t.view.data, out.data(), out.size());
    return out;
  }

  // Stacks several [r_i, cols] matrices into one f32 [sum r_i, cols].
  Matrix stacked(const std::vector<std::string>& names, int64_t rows_each, int64_t cols) const {
    Matrix m;
    m.rows = rows_each * static_cast<int64_t>(names.size());
    m.cols = cols;
    m.f32.resize(static_cast<size_t>(m.rows * cols));
    for (size_t i = 0; i < names.size(); ++i) {
      const CheckpointTensor& t = tensor(names[i], {rows_each, cols});
      convert_to_f32(t.view.dtype, t.view.data, m.f32.data() + i * rows_each * cols,
                     static_cast<size_t>(rows_each * cols));
    }
    return m;
  }

  // The shared embedding under any of its names.
  const CheckpointTensor& embedding() const {
    for (const char* name :
         {"shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight"}) {
      if (s_.find(name) != nullptr) return tensor(name, {c_.vocab_size, c_.d_model});
    }
    return tensor("shared.weight", {c_.vocab_size, c_.d_model});  // throws: missing
  }

 private:
  const SwitchConfig& c_;
  const TensorSource& s_;
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
  if (c.router_bias) b.moe.bias = m.vec(ff + "mlp.router.classifier.bias", {c.num_experts});
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

SwitchWeights map_weights(const SwitchConfig& c, const TensorSource& source,
                          const WeightOptions& options) {
  Mapper m(c, source);
  SwitchWeights w;
  const CheckpointTensor& emb = m.embedding();
  w.embed = Matrix{c.vocab_size, c.d_model, emb.view.dtype, emb.view.data, {}};
  const int64_t nb = c.relative_attention_num_buckets, H = c.num_heads;
  w.enc_rel_bias =
      m.vec("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", {nb, H});
  size_t expert_bytes = 0;
  for (int64_t i = 0; i < c.num_layers; ++i) {
    w.encoder.push_back(
        map_block(m, c, "encoder", i, false, c.encoder_block_sparse(i), &expert_bytes));
  }
  w.enc_final_ln = m.vec("encoder.final_layer_norm.weight", {c.d_model});
  w.has_decoder = !options.encoder_only;
  if (w.has_decoder) {
    w.dec_rel_bias =
        m.vec("decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", {nb, H});
    for (int64_t i = 0; i < c.num_decoder_layers; ++i) {
      w.decoder.push_back(
          map_block(m, c, "decoder", i, true, c.decoder_block_sparse(i), &expert_bytes));
    }
    w.dec_final_ln = m.vec("decoder.final_layer_norm.weight", {c.d_model});
    if (c.tie_word_embeddings) {
      w.lm_head = w.embed;
    } else {
      w.lm_head = m.matrix("lm_head.weight", c.vocab_size, c.d_model, false);
    }
  }
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

}  // namespace moetrace
