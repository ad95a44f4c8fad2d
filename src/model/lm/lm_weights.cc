#include "model/lm/lm_weights.h"

#include <string>

#include "core/error.h"
#include "core/log.h"

namespace moetrace {

namespace {

class LmMapper {
 public:
  explicit LmMapper(const TensorSource& s) : s_(s) {}

  bool has(const std::string& name) const { return s_.find(name) != nullptr; }

  // The tensor, checked for presence, shape and float dtype. `also` names an alternative layout
  // the message mentions when the tensor is missing.
  const CheckpointTensor& tensor(const std::string& name, const Shape& shape,
                                 const std::string& also = "") const {
    const CheckpointTensor* t = s_.find(name);
    if (t == nullptr) {
      const auto files = s_.files();
      fail(files.empty() ? std::string("checkpoint") : files.front().string(), ": tensor '", name,
           "' is missing (expected shape ", shape_str(shape), " for this config.json", also, ")");
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

  Matrix matrix(const std::string& name, int64_t rows, int64_t cols, bool to_f32,
                const std::string& also = "") const {
    const CheckpointTensor& t = tensor(name, {rows, cols}, also);
    Matrix m{rows, cols, t.view.dtype, t.view.data, {}};
    if (to_f32) m.materialize();
    return m;
  }

  std::vector<float> vec(const std::string& name, int64_t n) const {
    const CheckpointTensor& t = tensor(name, {n});
    std::vector<float> out(static_cast<size_t>(n));
    convert_to_f32(t.view.dtype, t.view.data, out.data(), out.size());
    return out;
  }

  // Routers decide every token's experts: NaN/Inf there makes the routing meaningless.
  void warn_non_finite(const std::string& name) const {
    const CheckpointTensor* t = s_.find(name);
    if (t == nullptr) return;
    const int64_t bad = count_non_finite(t->view);
    if (bad > 0) {
      log_warn(t->file.string(), ": router tensor '", name, "' has ", bad, " NaN/Inf value",
               bad == 1 ? "" : "s", " of ", t->view.numel(), "; routing through it is meaningless");
    }
  }

 private:
  const TensorSource& s_;
};

// A [rows, cols] slice of a 3-D tensor [E, R, cols]: expert e, rows r0..r0+rows-1 (dense).
Matrix slice(const CheckpointTensor& t, int64_t e, int64_t r0, int64_t rows) {
  const int64_t R = t.view.shape[1], cols = t.view.shape[2];
  const size_t offset = static_cast<size_t>((e * R + r0) * cols) * dtype_size(t.view.dtype);
  return Matrix{rows, cols, t.view.dtype, static_cast<const std::byte*>(t.view.data) + offset, {}};
}

LmMlp mlp(const LmMapper& m, const std::string& p, int64_t F, int64_t d, bool to_f32,
          const char* gate, const char* up, const char* down) {
  return LmMlp{m.matrix(p + gate + ".weight", F, d, to_f32),
               m.matrix(p + up + ".weight", F, d, to_f32),
               m.matrix(p + down + ".weight", d, F, to_f32)};
}

LmAttention attention(const LmMapper& m, const LmConfig& c, const std::string& p) {
  const int64_t d = c.hidden_size, q = c.num_attention_heads * c.head_dim,
                kv = c.num_key_value_heads * c.head_dim;
  LmAttention a;
  a.q = m.matrix(p + "q_proj.weight", q, d, true);
  a.k = m.matrix(p + "k_proj.weight", kv, d, true);
  a.v = m.matrix(p + "v_proj.weight", kv, d, true);
  a.o = m.matrix(p + "o_proj.weight", d, q, true);
  if (c.qkv_bias) {
    a.q_bias = m.vec(p + "q_proj.bias", q);
    a.k_bias = m.vec(p + "k_proj.bias", kv);
    a.v_bias = m.vec(p + "v_proj.bias", kv);
  }
  if (c.o_bias) a.o_bias = m.vec(p + "o_proj.bias", d);
  if (c.qk_norm == QkNorm::kFull) {
    a.q_norm = m.vec(p + "q_norm.weight", q);
    a.k_norm = m.vec(p + "k_norm.weight", kv);
  } else if (c.qk_norm == QkNorm::kPerHead) {
    a.q_norm = m.vec(p + "q_norm.weight", c.head_dim);
    a.k_norm = m.vec(p + "k_norm.weight", c.head_dim);
  }
  return a;
}

// The MoE block of layer L in whichever layout the checkpoint has; *layout gets its name.
LmMoe moe(const LmMapper& m, const LmConfig& c, int64_t L, std::string* layout) {
  const int64_t d = c.hidden_size, E = c.num_experts, F = c.moe_intermediate_size;
  const std::string layer = "model.layers." + std::to_string(L) + ".";
  const bool mixtral = c.family == LmFamily::kMixtral;
  // Mixtral's Hub checkpoints name the block block_sparse_moe; transformers 5.x's modules mlp.
  const std::string p =
      layer +
      (mixtral && m.has(layer + "block_sparse_moe.gate.weight") ? "block_sparse_moe." : "mlp.");
  LmMoe b;
  b.router = m.matrix(p + "gate.weight", E, d, true);
  m.warn_non_finite(p + "gate.weight");
  const std::string fused_gate_up = p + "experts.gate_up_proj";
  if (m.has(fused_gate_up)) {
    *layout = "fused";
    const CheckpointTensor& gu = m.tensor(fused_gate_up, {E, 2 * F, d});
    const CheckpointTensor& dn = m.tensor(p + "experts.down_proj", {E, d, F});
    for (int64_t e = 0; e < E; ++e)
      b.experts.push_back(LmMlp{slice(gu, e, 0, F), slice(gu, e, F, F), slice(dn, e, 0, d)});
  } else {
    *layout = "per-expert";
    const std::string also =
        "; nor is the fused '" + fused_gate_up + "' " + shape_str({E, 2 * F, d}) + " present";
    for (int64_t e = 0; e < E; ++e) {
      const std::string ep = p + "experts." + std::to_string(e) + ".";
      const char* g = mixtral ? "w1" : "gate_proj";
      const char* u = mixtral ? "w3" : "up_proj";
      const char* dw = mixtral ? "w2" : "down_proj";
      LmMlp x;
      x.gate = m.matrix(ep + g + ".weight", F, d, false, also);
      x.up = m.matrix(ep + u + ".weight", F, d, false);
      x.down = m.matrix(ep + dw + ".weight", d, F, false);
      b.experts.push_back(std::move(x));
    }
  }
  if (c.shared_expert_intermediate_size > 0) {
    b.has_shared = true;
    b.shared = mlp(m, p + "shared_expert.", c.shared_expert_intermediate_size, d, true, "gate_proj",
                   "up_proj", "down_proj");
    b.shared_gate = m.matrix(p + "shared_expert_gate.weight", 1, d, true);
  }
  return b;
}

}  // namespace

LmWeights map_lm_weights(const LmConfig& c, const TensorSource& source,
                         const WeightOptions& options) {
  const LmMapper m(source);
  const int64_t d = c.hidden_size, V = c.vocab_size;
  LmWeights w;
  w.embed = m.matrix("model.embed_tokens.weight", V, d, false);
  size_t expert_bytes = 0;
  for (int64_t L = 0; L < c.num_hidden_layers; ++L) {
    const std::string p = "model.layers." + std::to_string(L) + ".";
    LmLayer layer;
    layer.input_norm = m.vec(p + "input_layernorm.weight", d);
    layer.post_attn_norm = m.vec(p + "post_attention_layernorm.weight", d);
    layer.attn = attention(m, c, p + "self_attn.");
    layer.sparse = c.layer_sparse(L);
    if (layer.sparse) {
      std::string layout;
      layer.moe = moe(m, c, L, &layout);
      if (w.expert_layout.empty()) w.expert_layout = layout;
      for (const LmMlp& e : layer.moe.experts)
        expert_bytes += e.gate.f32_bytes() + e.up.f32_bytes() + e.down.f32_bytes();
    } else {
      layer.dense =
          mlp(m, p + "mlp.", c.intermediate_size, d, true, "gate_proj", "up_proj", "down_proj");
    }
    w.layers.push_back(std::move(layer));
  }
  w.final_norm = m.vec("model.norm.weight", d);
  if (c.tie_word_embeddings) {
    w.lm_head = w.embed;
  } else {
    w.lm_head = m.matrix("lm_head.weight", V, d, false);
  }
  if (expert_bytes <= options.f32_expert_budget_bytes) {
    for (LmLayer& layer : w.layers) {
      for (LmMlp& e : layer.moe.experts) {
        e.gate.materialize();
        e.up.materialize();
        e.down.materialize();
      }
    }
  }
  return w;
}

}  // namespace moetrace
