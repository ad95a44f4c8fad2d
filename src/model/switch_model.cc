#include "model/switch_model.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>

#include "core/error.h"
#include "kernels/cpu/ops.h"

namespace moetrace {

namespace {

constexpr float kLowest = std::numeric_limits<float>::lowest();

// Additive key mask of a padded batch: 0 for real tokens, the lowest float for padding [B*S].
std::vector<float> padding_mask_add(const Batch& batch) {
  std::vector<float> m(batch.attention_mask.size());
  for (size_t i = 0; i < m.size(); ++i) m[i] = batch.attention_mask[i] ? 0.0f : kLowest;
  return m;
}

std::string key(const char* stack, int64_t block, const char* name) {
  return std::string(stack) + "." + std::to_string(block) + "." + name;
}

template <class T>
void offer(Observer* obs, const std::string& k, DType dtype, Shape shape, const T* data) {
  if (obs != nullptr && obs->wants(k)) obs->observe(k, TensorView{dtype, std::move(shape), data});
}

bool wanted(Observer* obs, const std::string& k) { return obs != nullptr && obs->wants(k); }

// x[n,:] = embedding row ids[n], converted to f32.
void embed(const Matrix& table, const int32_t* ids, int64_t n, float* x, const char* what) {
  const int64_t d = table.cols;
  const size_t esize = dtype_size(table.dtype);
  for (int64_t i = 0; i < n; ++i) {
    if (ids[i] < 0 || ids[i] >= table.rows) {
      fail(what, "[", i, "] = ", ids[i], " is outside the vocabulary [0, ", table.rows, ")");
    }
  }
#pragma omp parallel for schedule(static) if (n * d > 65536)
  for (int64_t i = 0; i < n; ++i) {
    const auto* row =
        static_cast<const std::byte*>(table.raw) + static_cast<size_t>(ids[i] * d) * esize;
    convert_to_f32(table.dtype, row, x + i * d, static_cast<size_t>(d));
  }
}

// Multi-head attention, unscaled (T5): for each sequence b and head h,
//   ctx[b, i, h] = softmax_j(q[b,i,h] · k[b,j,h] + bias[h,i,j] + mask_add[b,j]) · v[b,j,h]
// q rows: q + b*q_bstride + i*ldq + h*dk; k/v likewise with kv_bstride/ldkv. bias [H,Sq,Sk] or
// null, mask_add [B,Sk] or null. ctx is [B*Sq, H*dk].
struct AttnArgs {
  int64_t B, Sq, Sk, H, dk;
  const float* q;
  int64_t ldq, q_bstride;
  const float* k;
  const float* v;
  int64_t ldkv, kv_bstride;
  const float* bias;
  const float* mask_add;
  float* ctx;
};

void attention(const AttnArgs& a) {
  const int64_t inner = a.H * a.dk;
#pragma omp parallel
  {
    std::vector<float> scores(static_cast<size_t>(a.Sq * a.Sk));
#pragma omp for schedule(dynamic)
    for (int64_t bh = 0; bh < a.B * a.H; ++bh) {
      const int64_t b = bh / a.H, h = bh % a.H;
      const float* q = a.q + b * a.q_bstride + h * a.dk;
      const float* k = a.k + b * a.kv_bstride + h * a.dk;
      const float* v = a.v + b * a.kv_bstride + h * a.dk;
      // [Sq, Sk] = q_bh [Sq, dk] · k_bhᵀ
      cpu::gemm_nt(a.Sq, a.Sk, a.dk, 1.0f, q, a.ldq, k, a.ldkv, 0.0f, scores.data(), a.Sk);
      for (int64_t i = 0; i < a.Sq; ++i) {
        float* s = scores.data() + i * a.Sk;
        if (a.bias != nullptr) {
          const float* bias = a.bias + (h * a.Sq + i) * a.Sk;
          if (a.mask_add != nullptr) {
            const float* m = a.mask_add + b * a.Sk;
            for (int64_t j = 0; j < a.Sk; ++j) s[j] += bias[j] + m[j];
          } else {
            for (int64_t j = 0; j < a.Sk; ++j) s[j] += bias[j];
          }
        } else if (a.mask_add != nullptr) {
          const float* m = a.mask_add + b * a.Sk;
          for (int64_t j = 0; j < a.Sk; ++j) s[j] += m[j];
        }
      }
      cpu::softmax_rows(scores.data(), a.Sq, a.Sk);
      // ctx_bh [Sq, dk] = P [Sq, Sk] · v_bh [Sk, dk]
      cpu::gemm_nn(a.Sq, a.dk, a.Sk, 1.0f, scores.data(), a.Sk, v, a.ldkv, 0.0f,
                   a.ctx + b * a.Sq * inner + h * a.dk, inner);
    }
  }
}

// Relative position bias [H, Sq, Sk] for queries at positions q0..q0+Sq-1 and keys 0..Sk-1; causal
// adds the lowest float to keys after the query.
std::vector<float> position_bias(const std::vector<float>& table, int64_t H, int64_t Sq, int64_t Sk,
                                 int64_t q0, bool bidirectional, bool causal,
                                 const SwitchConfig& c) {
  std::vector<float> bias(static_cast<size_t>(H * Sq * Sk));
  for (int64_t i = 0; i < Sq; ++i) {
    for (int64_t j = 0; j < Sk; ++j) {
      const int bucket =
          relative_position_bucket(j - (q0 + i), bidirectional, c.relative_attention_num_buckets,
                                   c.relative_attention_max_distance);
      const float m = (causal && j > q0 + i) ? kLowest : 0.0f;
      for (int64_t h = 0; h < H; ++h)
        bias[static_cast<size_t>((h * Sq + i) * Sk + j)] = table[bucket * H + h] + m;
    }
  }
  return bias;
}

// Dense FF: x += relu(h · wiᵀ) · woᵀ.
void dense_ff(const DenseMLP& m, const float* h, int64_t n, int64_t d, int64_t d_ff, float* x) {
  std::vector<float> tmp(static_cast<size_t>(n * d_ff));
  std::vector<float> scratch;
  cpu::gemm_nt(n, d_ff, d, 1.0f, h, d, m.wi.get(scratch), d, 0.0f, tmp.data(), d_ff);
  cpu::relu_inplace(tmp.data(), n * d_ff);
  cpu::gemm_nt(n, d, d_ff, 1.0f, tmp.data(), d_ff, m.wo.get(scratch), d_ff, 1.0f, x, d);
}

// The sparse layer over B sequences of S tokens (h [B*S, d] RMS-normed): router in f32, top-1 with
// lowest-index ties, per-sequence capacity in position order, x += gate · expert(h) for kept
// tokens; a dropped token adds nothing (the fixtures confirm this: adding gate · h instead misses
// by 10%).
void sparse_ff(const SwitchConfig& c, const SparseMLP& m, const float* h, int64_t B, int64_t S,
               float* x, Observer* obs, const char* stack, int64_t block) {
  const int64_t n = B * S, d = c.d_model, E = c.num_experts, d_ff = c.d_ff;
  std::vector<float> logits(static_cast<size_t>(n * E));
  std::vector<float> scratch;
  cpu::gemm_nt(n, E, d, 1.0f, h, d, m.router.get(scratch), d, 0.0f, logits.data(), E);
  if (!m.bias.empty()) {
    for (int64_t t = 0; t < n; ++t) {
      for (int64_t e = 0; e < E; ++e) logits[t * E + e] += m.bias[e];
    }
  }
  std::vector<float> probs = logits;
  cpu::softmax_rows(probs.data(), n, E);
  std::vector<int32_t> expert(static_cast<size_t>(n));
  std::vector<uint8_t> dropped(static_cast<size_t>(n));
  std::vector<float> gate(static_cast<size_t>(n));
  std::vector<int64_t> count(static_cast<size_t>(E));
  for (int64_t b = 0; b < B; ++b) {
    std::fill(count.begin(), count.end(), 0);
    for (int64_t s = 0; s < S; ++s) {
      const int64_t t = b * S + s;
      const float* p = probs.data() + t * E;
      int64_t best = 0;
      for (int64_t e = 1; e < E; ++e) {
        if (p[e] > p[best]) best = e;  // strict: ties keep the lowest index
      }
      expert[t] = static_cast<int32_t>(best);
      gate[t] = p[best];
      dropped[t] = ++count[best] > c.expert_capacity ? 1 : 0;
    }
  }
  offer(obs, key(stack, block, "hidden"), DType::kF32, {B, S, d}, h);
  offer(obs, key(stack, block, "router_logits"), DType::kF32, {B, S, E}, logits.data());
  offer(obs, key(stack, block, "expert"), DType::kI32, {B, S}, expert.data());
  offer(obs, key(stack, block, "dropped"), DType::kU8, {B, S}, dropped.data());
  offer(obs, key(stack, block, "gate"), DType::kF32, {B, S}, gate.data());

  // Tokens of each expert in position order.
  std::vector<std::vector<int64_t>> tokens(static_cast<size_t>(E));
  for (int64_t t = 0; t < n; ++t) {
    if (dropped[t]) {
      continue;  // carried by the residual only
    }
    tokens[static_cast<size_t>(expert[t])].push_back(t);
  }
  // Busiest experts first (longest-processing-time order): with one GEMM per thread, the dynamic
  // schedule then balances the threads even when routing is skewed.
  std::vector<int64_t> order(static_cast<size_t>(E));
  for (int64_t e = 0; e < E; ++e) order[static_cast<size_t>(e)] = e;
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
    return tokens[static_cast<size_t>(a)].size() > tokens[static_cast<size_t>(b)].size();
  });
  const bool nested = omp_get_max_threads() > 1 && E > 1;
#pragma omp parallel for schedule(dynamic) if (nested)
  for (int64_t oi = 0; oi < E; ++oi) {
    const int64_t e = order[static_cast<size_t>(oi)];
    const auto& tok = tokens[static_cast<size_t>(e)];
    if (tok.empty()) continue;
    const int64_t ne = static_cast<int64_t>(tok.size());
    thread_local std::vector<float> in, mid, out, wi_scratch, wo_scratch;
    in.resize(static_cast<size_t>(ne * d));
    mid.resize(static_cast<size_t>(ne * d_ff));
    out.resize(static_cast<size_t>(ne * d));
    for (int64_t r = 0; r < ne; ++r) std::copy_n(h + tok[r] * d, d, in.data() + r * d);
    const Expert& ex = m.experts[static_cast<size_t>(e)];
    cpu::gemm_nt(ne, d_ff, d, 1.0f, in.data(), d, ex.wi.get(wi_scratch), d, 0.0f, mid.data(), d_ff);
    cpu::relu_inplace(mid.data(), ne * d_ff);
    cpu::gemm_nt(ne, d, d_ff, 1.0f, mid.data(), d_ff, ex.wo.get(wo_scratch), d_ff, 0.0f, out.data(),
                 d);
    for (int64_t r = 0; r < ne; ++r) {
      const float g = gate[tok[r]];
      float* xr = x + tok[r] * d;
      const float* o = out.data() + r * d;
      for (int64_t j = 0; j < d; ++j) xr[j] += g * o[j];
    }
  }
}

void feed_forward(const SwitchConfig& c, const Block& blk, const float* x_in, int64_t B, int64_t S,
                  float* x, std::vector<float>& h, Observer* obs, const char* stack,
                  int64_t block) {
  const int64_t n = B * S, d = c.d_model;
  cpu::rmsnorm(x_in, blk.ln_ff.data(), n, d, static_cast<float>(c.layer_norm_epsilon), h.data());
  if (blk.sparse) {
    sparse_ff(c, blk.moe, h.data(), B, S, x, obs, stack, block);
  } else {
    dense_ff(blk.dense, h.data(), n, d, c.d_ff, x);
  }
}

}  // namespace

int relative_position_bucket(int64_t rp, bool bidirectional, int64_t num_buckets,
                             int64_t max_distance) {
  int64_t bucket = 0;
  int64_t nb = num_buckets;
  int64_t a;
  if (bidirectional) {
    nb /= 2;
    if (rp > 0) bucket += nb;
    a = rp < 0 ? -rp : rp;
  } else {
    a = rp < 0 ? -rp : 0;
  }
  const int64_t max_exact = nb / 2;
  if (a < max_exact) return static_cast<int>(bucket + a);
  // float32 as in the reference; truncation toward zero.
  float v = std::log(static_cast<float>(a) / static_cast<float>(max_exact));
  v = v / static_cast<float>(
              std::log(static_cast<double>(max_distance) / static_cast<double>(max_exact)));
  v = v * static_cast<float>(nb - max_exact);
  const int64_t large = std::min<int64_t>(max_exact + static_cast<int64_t>(v), nb - 1);
  return static_cast<int>(bucket + large);
}

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
  const int64_t B = batch.B, S = batch.S, n = B * S, d = c.d_model, H = c.num_heads, dk = c.d_kv;
  const int64_t inner = H * dk;
  MT_ASSERT(static_cast<int64_t>(batch.input_ids.size()) == n);
  MT_ASSERT(static_cast<int64_t>(batch.attention_mask.size()) == n);
  const float eps = static_cast<float>(c.layer_norm_epsilon);

  Tensor out(DType::kF32, {B, S, d});
  float* x = out.data<float>();
  embed(weights_.embed, batch.input_ids.data(), n, x, "input_ids");
  const std::vector<float> bias = position_bias(weights_.enc_rel_bias, H, S, S, 0, true, false, c);
  const std::vector<float> mask_add = padding_mask_add(batch);

  std::vector<float> h(static_cast<size_t>(n * d)), qkv(static_cast<size_t>(n * 3 * inner)),
      ctx(static_cast<size_t>(n * inner));
  std::vector<float> scratch;
  for (int64_t i = 0; i < c.num_layers; ++i) {
    const Block& blk = weights_.encoder[static_cast<size_t>(i)];
    offer(obs, key("enc", i, "input"), DType::kF32, {B, S, d}, x);
    cpu::rmsnorm(x, blk.ln_attn.data(), n, d, eps, h.data());
    cpu::gemm_nt(n, 3 * inner, d, 1.0f, h.data(), d, blk.self_attn.qkv.get(scratch), d, 0.0f,
                 qkv.data(), 3 * inner);
    attention(AttnArgs{B, S, S, H, dk, qkv.data(), 3 * inner, S * 3 * inner, qkv.data() + inner,
                       qkv.data() + 2 * inner, 3 * inner, S * 3 * inner, bias.data(),
                       mask_add.data(), ctx.data()});
    cpu::gemm_nt(n, d, inner, 1.0f, ctx.data(), inner, blk.self_attn.o.get(scratch), inner, 1.0f, x,
                 d);
    feed_forward(c, blk, x, B, S, x, h, obs, "enc", i);
  }
  cpu::rmsnorm(x, weights_.enc_final_ln.data(), n, d, eps, x);
  if (wanted(obs, "enc.output")) obs->observe("enc.output", out.view());
  return out;
}

namespace {

// Cross-attention sub-layer of decoder block blk for B sequences of Tq query rows (y [B*Tq, d]):
// y += o · attention(q(rmsnorm(y)), encoder keys/values kv [B*S, 2*inner], padding mask).
void cross_attention(const SwitchConfig& c, const Block& blk, const float* kv,
                     const float* enc_mask, int64_t B, int64_t Tq, int64_t S, float* y,
                     std::vector<float>& h, std::vector<float>& q, std::vector<float>& ctx,
                     std::vector<float>& scratch) {
  const int64_t n = B * Tq, d = c.d_model, inner = c.num_heads * c.d_kv;
  cpu::rmsnorm(y, blk.ln_cross.data(), n, d, static_cast<float>(c.layer_norm_epsilon), h.data());
  cpu::gemm_nt(n, inner, d, 1.0f, h.data(), d, blk.cross_attn.q.get(scratch), d, 0.0f, q.data(),
               inner);
  attention(AttnArgs{B, Tq, S, c.num_heads, c.d_kv, q.data(), inner, Tq * inner, kv, kv + inner,
                     2 * inner, S * 2 * inner, nullptr, enc_mask, ctx.data()});
  cpu::gemm_nt(n, d, inner, 1.0f, ctx.data(), inner, blk.cross_attn.o.get(scratch), inner, 1.0f, y,
               d);
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
  cpu::rmsnorm(y, w.dec_final_ln.data(), n, d, static_cast<float>(c.layer_norm_epsilon), y);
  const float scale =
      c.tie_word_embeddings ? static_cast<float>(std::pow(static_cast<double>(d), -0.5)) : 1.0f;
  for (int64_t i = 0; i < n * d; ++i) y[i] *= scale;
  std::vector<float> scratch;
  cpu::gemm_nt(n, V, d, 1.0f, y, d, w.lm_head.get(scratch), d, 0.0f, logits, V);
}

}  // namespace

Tensor SwitchModel::decode(const Tensor& enc_out, const Batch& batch,
                           const std::vector<int32_t>& dec_ids, int64_t T, Observer* obs) const {
  if (!weights_.has_decoder)
    fail("the model was loaded encoder-only; the decoder is not available");
  const SwitchConfig& c = config_;
  const int64_t B = batch.B, S = batch.S, n = B * T, d = c.d_model, H = c.num_heads, dk = c.d_kv;
  const int64_t inner = H * dk;
  const float eps = static_cast<float>(c.layer_norm_epsilon);
  MT_ASSERT(static_cast<int64_t>(dec_ids.size()) == n);

  std::vector<float> y(static_cast<size_t>(n * d));
  embed(weights_.embed, dec_ids.data(), n, y.data(), "decoder_input_ids");
  const std::vector<float> self_bias =
      position_bias(weights_.dec_rel_bias, H, T, T, 0, false, true, c);
  const std::vector<float> enc_mask = padding_mask_add(batch);
  const auto kv = cross_kv(c, weights_, enc_out);

  std::vector<float> h(static_cast<size_t>(n * d)), qkv(static_cast<size_t>(n * 3 * inner)),
      ctx(static_cast<size_t>(n * inner)), q(static_cast<size_t>(n * inner));
  std::vector<float> scratch;
  for (int64_t i = 0; i < c.num_decoder_layers; ++i) {
    const Block& blk = weights_.decoder[static_cast<size_t>(i)];
    offer(obs, key("dec", i, "input"), DType::kF32, {B, T, d}, y.data());
    cpu::rmsnorm(y.data(), blk.ln_attn.data(), n, d, eps, h.data());
    cpu::gemm_nt(n, 3 * inner, d, 1.0f, h.data(), d, blk.self_attn.qkv.get(scratch), d, 0.0f,
                 qkv.data(), 3 * inner);
    attention(AttnArgs{B, T, T, H, dk, qkv.data(), 3 * inner, T * 3 * inner, qkv.data() + inner,
                       qkv.data() + 2 * inner, 3 * inner, T * 3 * inner, self_bias.data(), nullptr,
                       ctx.data()});
    cpu::gemm_nt(n, d, inner, 1.0f, ctx.data(), inner, blk.self_attn.o.get(scratch), inner, 1.0f,
                 y.data(), d);

    cross_attention(c, blk, kv[static_cast<size_t>(i)].data(), enc_mask.data(), B, T, S, y.data(),
                    h, q, ctx, scratch);
    feed_forward(c, blk, y.data(), B, T, y.data(), h, obs, "dec", i);
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
  const int64_t B = batch.B, S = batch.S, d = c.d_model, H = c.num_heads, dk = c.d_kv,
                V = c.vocab_size;
  const int64_t inner = H * dk, L = c.num_decoder_layers,
                Tmax = std::max<int64_t>(max_new_tokens, 1);
  const float eps = static_cast<float>(c.layer_norm_epsilon);

  const std::vector<float> enc_mask = padding_mask_add(batch);
  const auto kv = cross_kv(c, weights_, enc_out);
  // Self-attention cache per layer: [B, Tmax, 2*inner] (k then v of each position).
  std::vector<std::vector<float>> cache(
      static_cast<size_t>(L), std::vector<float>(static_cast<size_t>(B * Tmax * 2 * inner)));

  GenerateResult r;
  r.B = B;
  std::vector<int32_t> cur(static_cast<size_t>(B), static_cast<int32_t>(c.decoder_start_token_id));
  std::vector<std::vector<int32_t>> seqs(static_cast<size_t>(B), std::vector<int32_t>{cur[0]});
  std::vector<bool> finished(static_cast<size_t>(B), false);
  std::vector<float> y(static_cast<size_t>(B * d)), h(static_cast<size_t>(B * d)),
      qkv(static_cast<size_t>(B * 3 * inner)), ctx(static_cast<size_t>(B * inner)),
      q(static_cast<size_t>(B * inner)), logits(static_cast<size_t>(B * V));
  std::vector<float> scratch;
  int64_t steps = 0;
  for (int64_t t = 0; t < max_new_tokens; ++t) {
    embed(weights_.embed, cur.data(), B, y.data(), "decoder token");
    const std::vector<float> bias =
        position_bias(weights_.dec_rel_bias, H, 1, t + 1, t, false, true, c);
    for (int64_t i = 0; i < L; ++i) {
      const Block& blk = weights_.decoder[static_cast<size_t>(i)];
      offer(obs, key("dec", i, "input"), DType::kF32, {B, 1, d}, y.data());
      cpu::rmsnorm(y.data(), blk.ln_attn.data(), B, d, eps, h.data());
      cpu::gemm_nt(B, 3 * inner, d, 1.0f, h.data(), d, blk.self_attn.qkv.get(scratch), d, 0.0f,
                   qkv.data(), 3 * inner);
      float* ci = cache[static_cast<size_t>(i)].data();
      for (int64_t b = 0; b < B; ++b) {
        std::copy_n(qkv.data() + b * 3 * inner + inner, 2 * inner, ci + (b * Tmax + t) * 2 * inner);
      }
      attention(AttnArgs{B, 1, t + 1, H, dk, qkv.data(), 3 * inner, 3 * inner, ci, ci + inner,
                         2 * inner, Tmax * 2 * inner, bias.data(), nullptr, ctx.data()});
      cpu::gemm_nt(B, d, inner, 1.0f, ctx.data(), inner, blk.self_attn.o.get(scratch), inner, 1.0f,
                   y.data(), d);

      cross_attention(c, blk, kv[static_cast<size_t>(i)].data(), enc_mask.data(), B, 1, S, y.data(),
                      h, q, ctx, scratch);
      feed_forward(c, blk, y.data(), B, 1, y.data(), h, obs, "dec", i);
    }
    lm_head(c, weights_, y.data(), B, logits.data());
    bool all_done = true;
    for (int64_t b = 0; b < B; ++b) {
      float* lb = logits.data() + b * V;
      if (t < min_new_tokens) lb[c.eos_token_id] = -std::numeric_limits<float>::infinity();
      int32_t next = static_cast<int32_t>(std::max_element(lb, lb + V) - lb);  // first maximum
      if (finished[b]) next = static_cast<int32_t>(c.pad_token_id);
      if (next == c.eos_token_id) finished[b] = true;
      cur[b] = next;
      seqs[b].push_back(next);
      all_done = all_done && finished[b];
    }
    steps = t + 1;
    if (all_done) break;
  }
  r.steps = steps;
  r.ids.reserve(static_cast<size_t>(B * (steps + 1)));
  for (const auto& s : seqs) r.ids.insert(r.ids.end(), s.begin(), s.end());
  return r;
}

}  // namespace moetrace
