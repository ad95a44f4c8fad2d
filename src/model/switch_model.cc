#include "model/switch_model.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>

#include "core/error.h"
#include "core/keys.h"
#include "kernels/cpu/ops.h"

namespace moetrace {

namespace {

// The CPU engine computes in float32 throughout: its ops round to nothing.
constexpr DType kAct = DType::kF32;

using keys::Stack;

template <class T>
void offer(Observer* obs, Stack stack, int64_t block, std::string_view field, DType dtype,
           Shape shape, const T* data) {
  if (obs == nullptr) return;
  const std::string k = keys::tensor(stack, static_cast<int>(block), field);
  if (obs->wants(k)) obs->observe(k, TensorView{dtype, std::move(shape), data});
}

// The buffers of one pass over n = B*S token rows (B sequences of S positions), allocated once and
// reused by every block; q only for a decoder pass (cross-attention).
struct Activations {
  Activations(const SwitchConfig& c, int64_t B, int64_t S, bool decoder)
      : B(B),
        S(S),
        n(B * S),
        h(static_cast<size_t>(n * c.d_model)),
        qkv(static_cast<size_t>(n * 3 * c.num_heads * c.d_kv)),
        q(decoder ? static_cast<size_t>(n * c.num_heads * c.d_kv) : 0),
        ctx(static_cast<size_t>(n * c.num_heads * c.d_kv)),
        ffn(static_cast<size_t>(n * c.d_ff)),
        router_logits(static_cast<size_t>(n * c.num_experts)),
        expert(static_cast<size_t>(n)),
        dropped(static_cast<size_t>(n)),
        gate(static_cast<size_t>(n)),
        counts(static_cast<size_t>(c.num_experts)) {}

  int64_t B, S, n;
  std::vector<float> h;              // [n, d] RMS-normed input of the current sub-layer
  std::vector<float> qkv;            // [n, 3*inner] self-attention q | k | v
  std::vector<float> q;              // [n, inner] cross-attention queries (decoder)
  std::vector<float> ctx;            // [n, inner] attention output before the o projection
  std::vector<float> ffn;            // [n, d_ff] dense FFN inner activations
  std::vector<float> router_logits;  // [n, E] float32 even for bf16 weights
  std::vector<int32_t> expert;       // [n] top-1 choice
  std::vector<uint8_t> dropped;      // [n] over expert capacity
  std::vector<float> gate;           // [n] top-1 probability
  std::vector<int32_t> counts;       // [E] kept tokens per expert
  std::vector<float> scratch;        // dense weights converted to float32
};

// x[n,:] = embedding row ids[n] as float32; `what` names the ids in the error.
void embed(const Matrix& table, const int32_t* ids, int64_t n, float* x, const char* what) {
  for (int64_t i = 0; i < n; ++i) {
    if (ids[i] < 0 || ids[i] >= table.rows) {
      fail(what, "[", i, "] = ", ids[i], " is outside the vocabulary [0, ", table.rows, ")");
    }
  }
  cpu::embed(ids, table.raw, table.dtype, n, table.cols, x);
}

// a.h = rmsnorm(x) with weight w.
void norm(const SwitchConfig& c, const std::vector<float>& w, const float* x, Activations& a) {
  cpu::rmsnorm(x, w.data(), a.n, c.d_model, static_cast<float>(c.layer_norm_epsilon), a.h.data(),
               kAct);
}

// a.qkv = rmsnorm(x) · Wqkvᵀ.
void qkv_projection(const SwitchConfig& c, const Block& blk, const float* x, Activations& a) {
  const int64_t d = c.d_model, inner = c.num_heads * c.d_kv;
  norm(c, blk.ln_attn, x, a);
  cpu::gemm_nt(a.n, 3 * inner, d, 1.0f, a.h.data(), d, blk.self_attn.qkv.get(a.scratch), d, 0.0f,
               a.qkv.data(), 3 * inner);
}

// x += a.ctx · Woᵀ.
void output_projection(const SwitchConfig& c, const Matrix& o, Activations& a, float* x) {
  const int64_t d = c.d_model, inner = c.num_heads * c.d_kv;
  cpu::gemm_nt(a.n, d, inner, 1.0f, a.ctx.data(), inner, o.get(a.scratch), inner, 1.0f, x, d);
}

// Encoder self-attention sub-layer: x += o · attention(qkv(rmsnorm(x))) with the bidirectional
// position bias [H, 2S-1] and the padding mask [B, S].
void encoder_attention(const SwitchConfig& c, const Block& blk, const std::vector<float>& bias,
                       const int32_t* mask, Activations& a, float* x) {
  qkv_projection(c, blk, x, a);
  cpu::attention(a.qkv.data(), bias.data(), mask, false, a.B, a.S, c.num_heads, c.d_kv,
                 a.ctx.data(), kAct);
  output_projection(c, blk.self_attn.o, a, x);
}

// Teacher-forced decoder self-attention over its own S positions, causal, with the distance bias
// [H, S].
void decoder_attention(const SwitchConfig& c, const Block& blk, const std::vector<float>& bias,
                       Activations& a, float* y) {
  const int64_t inner = c.num_heads * c.d_kv, ld = 3 * inner;
  qkv_projection(c, blk, y, a);
  cpu::decode_attention(a.qkv.data(), ld, a.qkv.data() + inner, a.qkv.data() + 2 * inner, ld,
                        a.S * ld, bias.data(), a.S, nullptr, true, a.B, c.num_heads, a.S, a.S,
                        c.d_kv, a.ctx.data(), inner, kAct);
  output_projection(c, blk.self_attn.o, a, y);
}

// One generation step t of decoder self-attention: the new position's k | v go to the layer's
// cache [B, Tmax, 2*inner], the query attends over positions 0..t with the distance bias
// [H, Tmax].
void cached_attention(const SwitchConfig& c, const Block& blk, const std::vector<float>& bias,
                      int64_t t, int64_t Tmax, float* cache, Activations& a, float* y) {
  const int64_t inner = c.num_heads * c.d_kv;
  qkv_projection(c, blk, y, a);
  for (int64_t b = 0; b < a.B; ++b) {
    std::copy_n(a.qkv.data() + b * 3 * inner + inner, 2 * inner,
                cache + (b * Tmax + t) * 2 * inner);
  }
  cpu::decode_attention(a.qkv.data(), 3 * inner, cache, cache + inner, 2 * inner, Tmax * 2 * inner,
                        bias.data(), Tmax, nullptr, true, a.B, c.num_heads, 1, t + 1, c.d_kv,
                        a.ctx.data(), inner, kAct);
  output_projection(c, blk.self_attn.o, a, y);
}

// Cross-attention sub-layer: y += o · attention(q(rmsnorm(y)), encoder keys/values kv
// [B*S_enc, 2*inner], encoder padding mask [B, S_enc]).
void cross_attention(const SwitchConfig& c, const Block& blk, const float* kv, const int32_t* mask,
                     int64_t S_enc, Activations& a, float* y) {
  const int64_t d = c.d_model, inner = c.num_heads * c.d_kv;
  norm(c, blk.ln_cross, y, a);
  cpu::gemm_nt(a.n, inner, d, 1.0f, a.h.data(), d, blk.cross_attn.q.get(a.scratch), d, 0.0f,
               a.q.data(), inner);
  cpu::decode_attention(a.q.data(), inner, kv, kv + inner, 2 * inner, S_enc * 2 * inner, nullptr, 0,
                        mask, false, a.B, c.num_heads, a.S, S_enc, c.d_kv, a.ctx.data(), inner,
                        kAct);
  output_projection(c, blk.cross_attn.o, a, y);
}

// Dense FF on a.h: x += relu(h · wiᵀ) · woᵀ.
void dense_block(const SwitchConfig& c, const DenseMLP& m, Activations& a, float* x) {
  const int64_t d = c.d_model, d_ff = c.d_ff;
  cpu::gemm_nt(a.n, d_ff, d, 1.0f, a.h.data(), d, m.wi.get(a.scratch), d, 0.0f, a.ffn.data(), d_ff);
  cpu::relu_inplace(a.ffn.data(), a.n * d_ff, kAct);
  cpu::gemm_nt(a.n, d, d_ff, 1.0f, a.ffn.data(), d_ff, m.wo.get(a.scratch), d_ff, 1.0f, x, d);
}

// a.router_logits = h · Wrᵀ (+ bias), float32.
void router_logits(const SwitchConfig& c, const SparseMLP& m, Activations& a) {
  const int64_t d = c.d_model, E = c.num_experts;
  float* logits = a.router_logits.data();
  cpu::gemm_nt(a.n, E, d, 1.0f, a.h.data(), d, m.router.get(a.scratch), d, 0.0f, logits, E);
  if (m.bias.empty()) return;
  for (int64_t t = 0; t < a.n; ++t) {
    for (int64_t e = 0; e < E; ++e) logits[t * E + e] += m.bias[static_cast<size_t>(e)];
  }
}

// The sparse layer on a.h (SWITCH_SPEC.md): route, offer the routing to the observer, then
// x += gate · expert(h) for the kept tokens; a dropped token adds nothing (the fixtures confirm
// this: adding gate · h instead misses by 10%).
void moe_block(const SwitchConfig& c, const SparseMLP& m, Activations& a, float* x, Observer* obs,
               Stack stack, int64_t block) {
  const int64_t d = c.d_model, E = c.num_experts, B = a.B, S = a.S;
  router_logits(c, m, a);
  std::fill(a.counts.begin(), a.counts.end(), 0);
  cpu::moe_route(a.router_logits.data(), B, S, E, c.expert_capacity, kAct, a.expert.data(),
                 a.dropped.data(), a.gate.data(), a.counts.data());
  offer(obs, stack, block, keys::kHidden, DType::kF32, {B, S, d}, a.h.data());
  offer(obs, stack, block, keys::kRouterLogits, DType::kF32, {B, S, E}, a.router_logits.data());
  offer(obs, stack, block, keys::kExpert, DType::kI32, {B, S}, a.expert.data());
  offer(obs, stack, block, keys::kDropped, DType::kU8, {B, S}, a.dropped.data());
  offer(obs, stack, block, keys::kGate, DType::kF32, {B, S}, a.gate.data());
  auto weights = [&m](int64_t e, std::vector<float>& wi_scratch, std::vector<float>& wo_scratch) {
    const Expert& ex = m.experts[static_cast<size_t>(e)];
    return cpu::ExpertWeights{ex.wi.get(wi_scratch), ex.wo.get(wo_scratch)};
  };
  cpu::moe_ffn(a.h.data(), a.n, d, c.d_ff, E, weights, a.expert.data(), a.dropped.data(),
               a.gate.data(), kAct, x);
}

// FF sub-layer: x += ff(rmsnorm(x)), dense or sparse.
void ffn_block(const SwitchConfig& c, const Block& blk, Activations& a, float* x, Observer* obs,
               Stack stack, int64_t block) {
  norm(c, blk.ln_ff, x, a);
  if (blk.sparse) {
    moe_block(c, blk.moe, a, x, obs, stack, block);
  } else {
    dense_block(c, blk.dense, a, x);
  }
}

// Per-layer cross-attention keys/values of the encoder output: [B*S, 2*inner].
std::vector<std::vector<float>> cross_kv(const SwitchConfig& c, const SwitchWeights& w,
                                         const Tensor& enc_out) {
  const int64_t n = enc_out.dim(0) * enc_out.dim(1), d = c.d_model, inner = c.num_heads * c.d_kv;
  std::vector<std::vector<float>> out;
  std::vector<float> scratch;
  for (const Block& blk : w.decoder) {
    std::vector<float> kv(static_cast<size_t>(n * 2 * inner));
    cpu::gemm_nt(n, 2 * inner, d, 1.0f, enc_out.data<float>(), d, blk.cross_attn.kv.get(scratch), d,
                 0.0f, kv.data(), 2 * inner);
    out.push_back(std::move(kv));
  }
  return out;
}

// Final norm and LM head: logits [n, V] from y [n, d] (y is overwritten).
void lm_head(const SwitchConfig& c, const SwitchWeights& w, float* y, int64_t n, float* logits) {
  const int64_t d = c.d_model, V = c.vocab_size;
  cpu::rmsnorm(y, w.dec_final_ln.data(), n, d, static_cast<float>(c.layer_norm_epsilon), y, kAct);
  const float scale =
      c.tie_word_embeddings ? static_cast<float>(std::pow(static_cast<double>(d), -0.5)) : 1.0f;
  for (int64_t i = 0; i < n * d; ++i) y[i] *= scale;
  std::vector<float> scratch;
  cpu::gemm_nt(n, V, d, 1.0f, y, d, w.lm_head.get(scratch), d, 0.0f, logits, V);
}

}  // namespace

std::unique_ptr<SwitchModel> SwitchModel::load(const std::filesystem::path& dir,
                                               const LoadOptions& options) {
  SwitchConfig config = load_config(dir / "config.json");
  std::shared_ptr<TensorSource> source = open_checkpoint(dir);
  return from_source(std::move(config), std::move(source), options);
}

std::unique_ptr<SwitchModel> SwitchModel::from_source(SwitchConfig config,
                                                      std::shared_ptr<TensorSource> source,
                                                      const LoadOptions& options) {
  std::unique_ptr<SwitchModel> m(new SwitchModel());
  m->config_ = std::move(config);
  m->source_ = std::move(source);
  WeightOptions wo;
  wo.encoder_only = options.encoder_only;
  wo.f32_expert_budget_bytes = options.f32_expert_budget_bytes;
  m->weights_ = map_weights(m->config_, *m->source_, wo);
  if (m->weights_.has_decoder) m->weights_.lm_head.materialize();
  return m;
}

Tensor SwitchModel::encode(const Batch& batch, Observer* obs) const {
  const SwitchConfig& c = config_;
  const int64_t B = batch.B, S = batch.S, n = B * S, d = c.d_model;
  MT_ASSERT(static_cast<int64_t>(batch.input_ids.size()) == n);
  MT_ASSERT(static_cast<int64_t>(batch.attention_mask.size()) == n);

  Tensor out(DType::kF32, {B, S, d});
  float* x = out.data<float>();
  embed(weights_.embed, batch.input_ids.data(), n, x, "input_ids");
  const std::vector<float> bias = encoder_position_bias(weights_.enc_rel_bias, c.num_heads, S, c);
  Activations a(c, B, S, false);
  for (int64_t i = 0; i < c.num_layers; ++i) {
    const Block& blk = weights_.encoder[static_cast<size_t>(i)];
    offer(obs, Stack::kEncoder, i, keys::kInput, DType::kF32, {B, S, d}, x);
    encoder_attention(c, blk, bias, batch.attention_mask.data(), a, x);
    ffn_block(c, blk, a, x, obs, Stack::kEncoder, i);
  }
  cpu::rmsnorm(x, weights_.enc_final_ln.data(), n, d, static_cast<float>(c.layer_norm_epsilon), x,
               kAct);
  const std::string k(keys::kEncoderOutput);
  if (obs != nullptr && obs->wants(k)) obs->observe(k, out.view());
  return out;
}

Tensor SwitchModel::decode(const Tensor& enc_out, const Batch& batch,
                           const std::vector<int32_t>& dec_ids, int64_t T, Observer* obs) const {
  if (!weights_.has_decoder)
    fail("the model was loaded encoder-only; the decoder is not available");
  const SwitchConfig& c = config_;
  const int64_t B = batch.B, n = B * T, d = c.d_model;
  MT_ASSERT(static_cast<int64_t>(dec_ids.size()) == n);

  std::vector<float> y(static_cast<size_t>(n * d));
  embed(weights_.embed, dec_ids.data(), n, y.data(), "decoder_input_ids");
  const std::vector<float> bias = decoder_position_bias(weights_.dec_rel_bias, c.num_heads, T, c);
  const auto kv = cross_kv(c, weights_, enc_out);
  Activations a(c, B, T, true);
  for (int64_t i = 0; i < c.num_decoder_layers; ++i) {
    const Block& blk = weights_.decoder[static_cast<size_t>(i)];
    offer(obs, Stack::kDecoder, i, keys::kInput, DType::kF32, {B, T, d}, y.data());
    decoder_attention(c, blk, bias, a, y.data());
    cross_attention(c, blk, kv[static_cast<size_t>(i)].data(), batch.attention_mask.data(), batch.S,
                    a, y.data());
    ffn_block(c, blk, a, y.data(), obs, Stack::kDecoder, i);
  }
  Tensor logits(DType::kF32, {B, T, c.vocab_size});
  lm_head(c, weights_, y.data(), n, logits.data<float>());
  return logits;
}

GenerateResult SwitchModel::generate(const Tensor& enc_out, const Batch& batch,
                                     int64_t max_new_tokens, int64_t min_new_tokens,
                                     Observer* obs) const {
  if (!weights_.has_decoder)
    fail("the model was loaded encoder-only; the decoder is not available");
  const SwitchConfig& c = config_;
  const int64_t B = batch.B, d = c.d_model, V = c.vocab_size, inner = c.num_heads * c.d_kv;
  const int64_t L = c.num_decoder_layers, Tmax = std::max<int64_t>(max_new_tokens, 1);

  const auto kv = cross_kv(c, weights_, enc_out);
  const std::vector<float> bias =
      decoder_position_bias(weights_.dec_rel_bias, c.num_heads, Tmax, c);
  // Self-attention cache per layer: [B, Tmax, 2*inner] (k then v of each position).
  std::vector<std::vector<float>> cache(
      static_cast<size_t>(L), std::vector<float>(static_cast<size_t>(B * Tmax * 2 * inner)));

  std::vector<int32_t> cur(static_cast<size_t>(B), static_cast<int32_t>(c.decoder_start_token_id));
  std::vector<std::vector<int32_t>> seqs(static_cast<size_t>(B), std::vector<int32_t>{cur[0]});
  std::vector<uint8_t> finished(static_cast<size_t>(B), 0);
  std::vector<float> y(static_cast<size_t>(B * d)), logits(static_cast<size_t>(B * V));
  Activations a(c, B, 1, true);
  int64_t steps = 0;
  for (int64_t t = 0; t < max_new_tokens; ++t) {
    embed(weights_.embed, cur.data(), B, y.data(), "decoder token");
    for (int64_t i = 0; i < L; ++i) {
      const Block& blk = weights_.decoder[static_cast<size_t>(i)];
      offer(obs, Stack::kDecoder, i, keys::kInput, DType::kF32, {B, 1, d}, y.data());
      cached_attention(c, blk, bias, t, Tmax, cache[static_cast<size_t>(i)].data(), a, y.data());
      cross_attention(c, blk, kv[static_cast<size_t>(i)].data(), batch.attention_mask.data(),
                      batch.S, a, y.data());
      ffn_block(c, blk, a, y.data(), obs, Stack::kDecoder, i);
    }
    lm_head(c, weights_, y.data(), B, logits.data());
    const auto eos = static_cast<int32_t>(c.eos_token_id);
    cpu::greedy_pick(logits.data(), B, V, t < min_new_tokens ? eos : -1, eos,
                     static_cast<int32_t>(c.pad_token_id), finished.data(), cur.data());
    for (int64_t b = 0; b < B; ++b)
      seqs[static_cast<size_t>(b)].push_back(cur[static_cast<size_t>(b)]);
    steps = t + 1;
    if (std::all_of(finished.begin(), finished.end(), [](uint8_t f) { return f != 0; })) break;
  }
  GenerateResult r;
  r.B = B;
  r.steps = steps;
  r.ids.reserve(static_cast<size_t>(B * (steps + 1)));
  for (const auto& s : seqs) r.ids.insert(r.ids.end(), s.begin(), s.end());
  return r;
}

}  // namespace moetrace
