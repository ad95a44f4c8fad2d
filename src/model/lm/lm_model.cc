#include "model/lm/lm_model.h"

#include <algorithm>
#include <cmath>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/keys.h"
#include "kernels/cpu/ops.h"

namespace moetrace {

std::string lm_key(bool gen, int64_t block, std::string_view field) {
  std::string k = gen ? "gen." : "lm.";
  k += std::to_string(block);
  k += '.';
  k += field;
  return k;
}

void lm_topk_route(const float* logits, int64_t n, int64_t E, int64_t k, bool renormalize,
                   int32_t* ids, float* weights) {
  std::vector<float> p(static_cast<size_t>(E));
  std::vector<uint8_t> taken(static_cast<size_t>(E));
  for (int64_t t = 0; t < n; ++t) {
    std::copy_n(logits + t * E, E, p.data());
    float mx = -std::numeric_limits<float>::infinity();
    for (float v : p) mx = std::max(mx, v);
    float sum = 0.f;
    for (float& v : p) {
      v = std::exp(v - mx);
      sum += v;
    }
    for (float& v : p) v /= sum;
    std::fill(taken.begin(), taken.end(), 0);
    int32_t* id = ids + t * k;
    float* w = weights + t * k;
    for (int64_t r = 0; r < k; ++r) {
      int64_t best = -1;  // the first maximum among the experts not taken yet
      for (int64_t e = 0; e < E; ++e) {
        if (!taken[static_cast<size_t>(e)] &&
            (best < 0 || p[static_cast<size_t>(e)] > p[static_cast<size_t>(best)]))
          best = e;
      }
      taken[static_cast<size_t>(best)] = 1;
      id[r] = static_cast<int32_t>(best);
      w[r] = p[static_cast<size_t>(best)];
    }
    if (renormalize) {
      float s = 0.f;
      for (int64_t r = 0; r < k; ++r) s += w[r];
      for (int64_t r = 0; r < k; ++r) w[r] /= s;
    }
  }
}

std::vector<float> rope_inv_freq(const LmConfig& c) {
  const int64_t half = c.head_dim / 2;
  std::vector<float> f(static_cast<size_t>(half));
  const auto theta = static_cast<float>(c.rope_theta);
  for (int64_t i = 0; i < half; ++i) {
    const float e = static_cast<float>(2 * i) / static_cast<float>(c.head_dim);
    f[static_cast<size_t>(i)] = 1.0f / std::pow(theta, e);
    if (c.rope_type == RopeType::kLinear)
      f[static_cast<size_t>(i)] /= static_cast<float>(c.rope_factor);
  }
  return f;
}

namespace {

// transformers' eager attention adds the lowest float to masked scores (not -inf): a row with no
// visible key then attends uniformly instead of giving NaN.
constexpr float kLowest = std::numeric_limits<float>::lowest();

template <class T>
void offer(Observer* obs, const std::string& key, DType dtype, Shape shape, const T* data) {
  if (obs != nullptr && obs->wants(key))
    obs->observe(key, TensorView{dtype, std::move(shape), data});
}

// One layer's key/value cache: [B, T, KV*hd] each, keys after RoPE.
struct KvCache {
  std::vector<float> k, v;
};

// Where the Sq query rows of a pass sit: their RoPE positions [B, Sq], the cache index of the
// first (row s of sequence b is cache index start + s), the cache capacity T and which of the T
// keys are real tokens (mask [B, T], 1 = visible).
struct Pass {
  const int32_t* positions;
  int64_t start;
  int64_t T;
  const int32_t* mask;
};

// The buffers of one pass over n = B*Sq token rows, reused by every layer.
struct LmActs {
  LmActs(const LmConfig& c, int64_t B, int64_t Sq)
      : B(B),
        Sq(Sq),
        n(B * Sq),
        h(static_cast<size_t>(n * c.hidden_size)),
        q(static_cast<size_t>(n * c.num_attention_heads * c.head_dim)),
        k(static_cast<size_t>(n * c.num_key_value_heads * c.head_dim)),
        v(k.size()),
        ctx(q.size()),
        out(h.size()),
        router_logits(static_cast<size_t>(n * c.num_experts)),
        expert(static_cast<size_t>(n * c.top_k)),
        gate(static_cast<size_t>(n * c.top_k)) {}

  int64_t B, Sq, n;
  std::vector<float> h;              // [n, d] normed input of the current sub-layer
  std::vector<float> q;              // [n, H*hd]
  std::vector<float> k, v;           // [n, KV*hd] this pass's keys (after RoPE) and values
  std::vector<float> ctx;            // [n, H*hd] attention output before o_proj
  std::vector<float> out;            // [n, d] output of the current sub-layer
  std::vector<float> router_logits;  // [n, E] float32
  std::vector<int32_t> expert;       // [n, k] top-k ids, descending weight
  std::vector<float> gate;           // [n, k] their weights
};

// y[n, rows] = x[n, cols] · Wᵀ (+ bias).
void linear(const Matrix& w, const std::vector<float>& bias, const float* x, int64_t n, float* y) {
  std::vector<float> scratch;
  cpu::gemm_nt(n, w.rows, w.cols, 1.0f, x, w.cols, w.get(scratch), w.cols, 0.0f, y, w.rows);
  if (bias.empty()) return;
  for (int64_t r = 0; r < n; ++r) {
    for (int64_t j = 0; j < w.rows; ++j) y[r * w.rows + j] += bias[static_cast<size_t>(j)];
  }
}

float silu(float x) { return x / (1.0f + std::exp(-x)); }
float sigmoid(float x) { return 1.0f / (1.0f + std::exp(-x)); }

// RoPE, rotate_half convention: for each head of each row r at position pos[r], with
// a = x[i], b = x[i + hd/2], angle = pos · inv_freq[i]:  x[i] = a·cos - b·sin,
// x[i + hd/2] = b·cos + a·sin. x [n, heads*hd].
void rope(float* x, int64_t n, int64_t heads, int64_t hd, const int32_t* pos,
          const std::vector<float>& freq) {
  const int64_t half = hd / 2;
  for (int64_t r = 0; r < n; ++r) {
    for (int64_t i = 0; i < half; ++i) {
      const float angle = static_cast<float>(pos[r]) * freq[static_cast<size_t>(i)];
      const float cs = std::cos(angle), sn = std::sin(angle);
      for (int64_t h = 0; h < heads; ++h) {
        float* xh = x + (r * heads + h) * hd;
        const float a = xh[i], b = xh[i + half];
        xh[i] = a * cs - b * sn;
        xh[i + half] = b * cs + a * sn;
      }
    }
  }
}

void clamp(std::vector<float>& x, float lim) {
  for (float& v : x) v = std::min(std::max(v, -lim), lim);
}

// Grouped-query causal attention of the pass's query rows over the cache's keys 0..Sk-1
// (Sk = start + Sq): query head h reads kv head h / (H/KV); key j is visible from the query at
// cache index i iff j <= i, mask[b, j] = 1 and (sliding window W) i - j < W. Scores are
// q·k · hd^-0.5 with masked ones plus the lowest float; softmax in float32.
void attend(const LmConfig& c, const Pass& p, const KvCache& kv, LmActs& a) {
  const int64_t H = c.num_attention_heads, KV = c.num_key_value_heads, hd = c.head_dim;
  const int64_t rep = H / KV, ldq = H * hd, ldkv = KV * hd, Sk = p.start + a.Sq;
  const float scale = static_cast<float>(std::pow(static_cast<double>(hd), -0.5));
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t b = 0; b < a.B; ++b) {
    for (int64_t h = 0; h < H; ++h) {
      std::vector<float> s(static_cast<size_t>(Sk));
      const int64_t g = h / rep;
      const float* kb = kv.k.data() + b * p.T * ldkv + g * hd;
      const float* vb = kv.v.data() + b * p.T * ldkv + g * hd;
      for (int64_t r = 0; r < a.Sq; ++r) {
        const int64_t i = p.start + r;
        const float* qi = a.q.data() + (b * a.Sq + r) * ldq + h * hd;
        float mx = -std::numeric_limits<float>::infinity();
        for (int64_t j = 0; j < Sk; ++j) {
          float dot = 0.f;
          for (int64_t e = 0; e < hd; ++e) dot += qi[e] * kb[j * ldkv + e];
          float sc = dot * scale;
          const bool visible = j <= i && p.mask[b * p.T + j] != 0 &&
                               (c.sliding_window == 0 || i - j < c.sliding_window);
          if (!visible) sc += kLowest;
          s[static_cast<size_t>(j)] = sc;
          mx = std::max(mx, sc);
        }
        float sum = 0.f;
        for (int64_t j = 0; j < Sk; ++j) {
          s[static_cast<size_t>(j)] = std::exp(s[static_cast<size_t>(j)] - mx);
          sum += s[static_cast<size_t>(j)];
        }
        float* o = a.ctx.data() + (b * a.Sq + r) * ldq + h * hd;
        std::fill(o, o + hd, 0.f);
        for (int64_t j = 0; j < Sk; ++j) {
          const float pj = s[static_cast<size_t>(j)] / sum;
          for (int64_t e = 0; e < hd; ++e) o[e] += pj * vb[j * ldkv + e];
        }
      }
    }
  }
}

// Self-attention sub-layer: x += o_proj(attention(q, k, v of rmsnorm(x))); this pass's keys and
// values go to the cache at indices start..start+Sq-1.
void attention_block(const LmConfig& c, const LmLayer& L, const Pass& p,
                     const std::vector<float>& freq, KvCache& kv, LmActs& a, float* x) {
  const int64_t d = c.hidden_size, H = c.num_attention_heads, KV = c.num_key_value_heads,
                hd = c.head_dim, n = a.n;
  const auto eps = static_cast<float>(c.rms_norm_eps);
  cpu::rmsnorm(x, L.input_norm.data(), n, d, eps, a.h.data());
  linear(L.attn.q, L.attn.q_bias, a.h.data(), n, a.q.data());
  linear(L.attn.k, L.attn.k_bias, a.h.data(), n, a.k.data());
  linear(L.attn.v, L.attn.v_bias, a.h.data(), n, a.v.data());
  if (c.qk_norm == QkNorm::kFull) {  // olmoe: over the whole projection
    cpu::rmsnorm(a.q.data(), L.attn.q_norm.data(), n, H * hd, eps, a.q.data());
    cpu::rmsnorm(a.k.data(), L.attn.k_norm.data(), n, KV * hd, eps, a.k.data());
  } else if (c.qk_norm == QkNorm::kPerHead) {  // qwen3: each head alone
    cpu::rmsnorm(a.q.data(), L.attn.q_norm.data(), n * H, hd, eps, a.q.data());
    cpu::rmsnorm(a.k.data(), L.attn.k_norm.data(), n * KV, hd, eps, a.k.data());
  }
  if (c.clip_qkv > 0) {  // olmoe: after the norms, before RoPE
    const auto lim = static_cast<float>(c.clip_qkv);
    clamp(a.q, lim);
    clamp(a.k, lim);
    clamp(a.v, lim);
  }
  rope(a.q.data(), n, H, hd, p.positions, freq);
  rope(a.k.data(), n, KV, hd, p.positions, freq);
  const int64_t ldkv = KV * hd;
  for (int64_t b = 0; b < a.B; ++b) {
    for (int64_t s = 0; s < a.Sq; ++s) {
      const size_t src = static_cast<size_t>((b * a.Sq + s) * ldkv);
      const size_t dst = static_cast<size_t>((b * p.T + p.start + s) * ldkv);
      std::copy_n(a.k.data() + src, ldkv, kv.k.data() + dst);
      std::copy_n(a.v.data() + src, ldkv, kv.v.data() + dst);
    }
  }
  attend(c, p, kv, a);
  linear(L.attn.o, L.attn.o_bias, a.ctx.data(), n, a.out.data());
  for (int64_t i = 0; i < n * d; ++i) x[i] += a.out[static_cast<size_t>(i)];
}

// out[rows] (+)= weight[r] · down(silu(gate(h)) · up(h)) over the given rows of h [*, d] (all rows
// when `rows` is null, weight 1, out overwritten).
void swiglu(const LmMlp& m, const float* h, int64_t d, const std::vector<int64_t>* rows,
            const std::vector<float>* weight, int64_t n_all, float* out) {
  const int64_t n = rows != nullptr ? static_cast<int64_t>(rows->size()) : n_all;
  const int64_t F = m.gate.rows;
  std::vector<float> in, g(static_cast<size_t>(n * F)), u(g.size()), o(static_cast<size_t>(n * d));
  const float* x = h;
  if (rows != nullptr) {
    in.resize(static_cast<size_t>(n * d));
    for (int64_t r = 0; r < n; ++r) std::copy_n(h + (*rows)[r] * d, d, in.data() + r * d);
    x = in.data();
  }
  std::vector<float> sg, su, sd;
  cpu::gemm_nt(n, F, d, 1.0f, x, d, m.gate.get(sg), d, 0.0f, g.data(), F);
  cpu::gemm_nt(n, F, d, 1.0f, x, d, m.up.get(su), d, 0.0f, u.data(), F);
  for (size_t i = 0; i < g.size(); ++i) g[i] = silu(g[i]) * u[i];
  cpu::gemm_nt(n, d, F, 1.0f, g.data(), F, m.down.get(sd), F, 0.0f, o.data(), d);
  if (rows == nullptr) {
    std::copy(o.begin(), o.end(), out);
    return;
  }
  for (int64_t r = 0; r < n; ++r) {
    const float w = (*weight)[static_cast<size_t>(r)];
    float* dst = out + (*rows)[r] * d;
    for (int64_t j = 0; j < d; ++j) dst[j] += o[static_cast<size_t>(r * d + j)] * w;
  }
}

// The MoE block on a.h: a.out = Σ_r gate_r · expert_{id_r}(h), experts in ascending index order
// (as transformers' index_add), + sigmoid(shared_expert_gate(h)) · shared_expert(h) (qwen2_moe).
void moe_block(const LmConfig& c, const LmMoe& m, int64_t block, bool gen, LmActs& a,
               Observer* obs) {
  const int64_t d = c.hidden_size, E = c.num_experts, k = c.top_k, B = a.B, Sq = a.Sq;
  linear(m.router, {}, a.h.data(), a.n, a.router_logits.data());
  lm_topk_route(a.router_logits.data(), a.n, E, k, c.norm_topk_prob, a.expert.data(),
                a.gate.data());
  offer(obs, lm_key(gen, block, keys::kHidden), DType::kF32, {B, Sq, d}, a.h.data());
  offer(obs, lm_key(gen, block, keys::kRouterLogits), DType::kF32, {B, Sq, E},
        a.router_logits.data());
  offer(obs, lm_key(gen, block, keys::kExpert), DType::kI32, {B, Sq, k}, a.expert.data());
  offer(obs, lm_key(gen, block, keys::kGate), DType::kF32, {B, Sq, k}, a.gate.data());
  std::vector<std::vector<int64_t>> rows(static_cast<size_t>(E));
  std::vector<std::vector<float>> weights(static_cast<size_t>(E));
  for (int64_t t = 0; t < a.n; ++t) {
    for (int64_t r = 0; r < k; ++r) {
      const auto e = static_cast<size_t>(a.expert[static_cast<size_t>(t * k + r)]);
      rows[e].push_back(t);
      weights[e].push_back(a.gate[static_cast<size_t>(t * k + r)]);
    }
  }
  std::fill(a.out.begin(), a.out.end(), 0.f);
  for (int64_t e = 0; e < E; ++e) {
    if (!rows[static_cast<size_t>(e)].empty()) {
      swiglu(m.experts[static_cast<size_t>(e)], a.h.data(), d, &rows[static_cast<size_t>(e)],
             &weights[static_cast<size_t>(e)], a.n, a.out.data());
    }
  }
  if (!m.has_shared) return;
  std::vector<float> shared(static_cast<size_t>(a.n * d)), g(static_cast<size_t>(a.n));
  swiglu(m.shared, a.h.data(), d, nullptr, nullptr, a.n, shared.data());
  linear(m.shared_gate, {}, a.h.data(), a.n, g.data());
  for (int64_t t = 0; t < a.n; ++t) {
    const float s = sigmoid(g[static_cast<size_t>(t)]);
    for (int64_t j = 0; j < d; ++j)
      a.out[static_cast<size_t>(t * d + j)] += s * shared[static_cast<size_t>(t * d + j)];
  }
}

// MLP sub-layer: x += mlp(rmsnorm(x)), the MoE block or the dense SwiGLU.
void mlp_block(const LmConfig& c, const LmLayer& L, int64_t block, bool gen, LmActs& a, float* x,
               Observer* obs) {
  const int64_t d = c.hidden_size;
  cpu::rmsnorm(x, L.post_attn_norm.data(), a.n, d, static_cast<float>(c.rms_norm_eps), a.h.data());
  if (L.sparse) {
    moe_block(c, L.moe, block, gen, a, obs);
  } else {
    swiglu(L.dense, a.h.data(), d, nullptr, nullptr, a.n, a.out.data());
  }
  for (int64_t i = 0; i < a.n * d; ++i) x[i] += a.out[static_cast<size_t>(i)];
}

// Every decoder layer over the pass's rows; x [n, d] is the residual stream.
void layers(const LmConfig& c, const LmWeights& w, const Pass& p, const std::vector<float>& freq,
            std::vector<KvCache>& cache, LmActs& a, float* x, bool gen, Observer* obs) {
  for (int64_t i = 0; i < c.num_hidden_layers; ++i) {
    const LmLayer& L = w.layers[static_cast<size_t>(i)];
    attention_block(c, L, p, freq, cache[static_cast<size_t>(i)], a, x);
    mlp_block(c, L, i, gen, a, x, obs);
  }
}

std::vector<KvCache> make_cache(const LmConfig& c, int64_t B, int64_t T) {
  const auto size = static_cast<size_t>(B * T * c.num_key_value_heads * c.head_dim);
  std::vector<KvCache> cache(static_cast<size_t>(c.num_hidden_layers));
  for (KvCache& kv : cache) {
    kv.k.resize(size);
    kv.v.resize(size);
  }
  return cache;
}

// x[n, d] = embedding rows of ids; Error naming the row of an id outside the vocabulary.
void embed(const LmWeights& w, const int32_t* ids, int64_t n, float* x) {
  for (int64_t i = 0; i < n; ++i) {
    if (ids[i] < 0 || ids[i] >= w.embed.rows) {
      fail("input_ids[", i, "] = ", ids[i], " is outside the vocabulary [0, ", w.embed.rows, ")");
    }
  }
  cpu::embed(ids, w.embed.raw, w.embed.dtype, n, w.embed.cols, x);
}

// logits [n, V] = rmsnorm(x, model.norm) · lm_headᵀ; x [n, d] is overwritten by the normed rows.
void lm_head(const LmConfig& c, const LmWeights& w, float* x, int64_t n, float* logits) {
  const int64_t d = c.hidden_size;
  cpu::rmsnorm(x, w.final_norm.data(), n, d, static_cast<float>(c.rms_norm_eps), x);
  std::vector<float> scratch;
  cpu::gemm_nt(n, c.vocab_size, d, 1.0f, x, d, w.lm_head.get(scratch), d, 0.0f, logits,
               c.vocab_size);
}

// The first maximum of logits[V] among the ids not banned.
int32_t greedy(const float* logits, int64_t V, const std::vector<int64_t>& banned) {
  int64_t best = -1;
  for (int64_t j = 0; j < V; ++j) {
    if (std::find(banned.begin(), banned.end(), j) != banned.end()) continue;
    if (best < 0 || logits[j] > logits[best]) best = j;
  }
  MT_ASSERT(best >= 0);
  return static_cast<int32_t>(best);
}

void check_batch(const Batch& batch) {
  MT_ASSERT(static_cast<int64_t>(batch.input_ids.size()) == batch.B * batch.S);
  MT_ASSERT(static_cast<int64_t>(batch.attention_mask.size()) == batch.B * batch.S);
  for (int64_t i = 0; i < batch.B * batch.S; ++i) {
    const int32_t m = batch.attention_mask[static_cast<size_t>(i)];
    if (m != 0 && m != 1) fail("attention_mask[", i, "] = ", m, " (expected 0 or 1)");
  }
}

// generation_config.json's eos_token_id (int or list) when the file has one.
bool generation_eos(const std::filesystem::path& file, std::vector<int64_t>* out) {
  std::ifstream in(file);
  if (!in) return false;
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(in);
  } catch (const nlohmann::json::exception& e) {
    fail(file.string(), ": not valid JSON (", e.what(), ")");
  }
  if (!j.is_object() || !j.contains("eos_token_id") || j["eos_token_id"].is_null()) return false;
  const nlohmann::json& v = j["eos_token_id"];
  out->clear();
  if (v.is_number_integer()) {
    out->push_back(v.get<int64_t>());
    return true;
  }
  if (!v.is_array()) fail(file.string(), ": field 'eos_token_id' must be an integer or a list");
  for (const auto& e : v) {
    if (!e.is_number_integer())
      fail(file.string(), ": field 'eos_token_id' must be an integer or a list of integers");
    out->push_back(e.get<int64_t>());
  }
  return true;
}

}  // namespace

std::unique_ptr<LmModel> LmModel::load(const std::filesystem::path& dir,
                                       const WeightOptions& options) {
  LmConfig config = load_lm_config(dir / "config.json");
  std::unique_ptr<LmModel> m = from_source(std::move(config), open_checkpoint(dir), options);
  std::vector<int64_t> eos;
  if (generation_eos(dir / "generation_config.json", &eos)) m->banned_ = eos;
  return m;
}

std::unique_ptr<LmModel> LmModel::from_source(LmConfig config, std::shared_ptr<TensorSource> source,
                                              const WeightOptions& options) {
  std::unique_ptr<LmModel> m(new LmModel());
  m->config_ = std::move(config);
  m->source_ = std::move(source);
  m->weights_ = map_lm_weights(m->config_, *m->source_, options);
  m->weights_.lm_head.materialize();
  m->banned_ = m->config_.eos_token_ids;
  return m;
}

Tensor LmModel::forward(const Batch& batch, Observer* obs) const {
  check_batch(batch);
  const LmConfig& c = config_;
  const int64_t B = batch.B, S = batch.S, n = B * S, d = c.hidden_size;
  std::vector<float> x(static_cast<size_t>(n * d));
  embed(weights_, batch.input_ids.data(), n, x.data());
  std::vector<int32_t> positions(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) positions[static_cast<size_t>(i)] = static_cast<int32_t>(i % S);
  const Pass p{positions.data(), 0, S, batch.attention_mask.data()};
  std::vector<KvCache> cache = make_cache(c, B, S);
  LmActs a(c, B, S);
  layers(c, weights_, p, rope_inv_freq(c), cache, a, x.data(), false, obs);
  Tensor logits(DType::kF32, {B, S, c.vocab_size});
  lm_head(c, weights_, x.data(), n, logits.data<float>());
  offer(obs, std::string("lm.output"), DType::kF32, {B, S, d}, x.data());
  return logits;
}

LmGenerateResult LmModel::generate(const Batch& batch, int64_t new_tokens, Observer* obs) const {
  check_batch(batch);
  if (new_tokens < 1) fail("generate: the number of new tokens must be >= 1, got ", new_tokens);
  const LmConfig& c = config_;
  const int64_t B = batch.B, S = batch.S, d = c.hidden_size, V = c.vocab_size;
  const int64_t T = S + new_tokens;
  // Keys: the prompt's mask, then every generated token visible.
  std::vector<int32_t> mask(static_cast<size_t>(B * T), 1);
  // generate's positions: cumsum(mask) - 1 over the prompt, pads 0.
  std::vector<int32_t> positions(static_cast<size_t>(B * S));
  for (int64_t b = 0; b < B; ++b) {
    int32_t seen = 0;
    for (int64_t s = 0; s < S; ++s) {
      const int32_t m = batch.attention_mask[static_cast<size_t>(b * S + s)];
      mask[static_cast<size_t>(b * T + s)] = m;
      seen += m;
      positions[static_cast<size_t>(b * S + s)] = m != 0 ? seen - 1 : 0;
    }
  }
  const std::vector<float> freq = rope_inv_freq(c);
  std::vector<KvCache> cache = make_cache(c, B, T);

  LmGenerateResult r;
  r.B = B;
  r.S = S;
  r.new_tokens = new_tokens;
  std::vector<std::vector<int32_t>> seqs(static_cast<size_t>(B));
  for (int64_t b = 0; b < B; ++b) {
    seqs[static_cast<size_t>(b)].assign(batch.input_ids.begin() + b * S,
                                        batch.input_ids.begin() + (b + 1) * S);
  }
  std::vector<int32_t> next(static_cast<size_t>(B));
  std::vector<float> logits(static_cast<size_t>(B * V)), last(static_cast<size_t>(B * d));
  {  // prefill: the whole prompt; the next token comes from its last column
    std::vector<float> x(static_cast<size_t>(B * S * d));
    embed(weights_, batch.input_ids.data(), B * S, x.data());
    const Pass p{positions.data(), 0, T, mask.data()};
    LmActs a(c, B, S);
    layers(c, weights_, p, freq, cache, a, x.data(), false, obs);
    for (int64_t b = 0; b < B; ++b)
      std::copy_n(x.data() + ((b + 1) * S - 1) * d, d, last.data() + b * d);
  }
  std::vector<int32_t> step_pos(static_cast<size_t>(B));
  for (int64_t t = 0; t < new_tokens; ++t) {
    if (t > 0) {  // one cached step over the token chosen last, at cache index S + t - 1
      for (int64_t b = 0; b < B; ++b) {
        step_pos[static_cast<size_t>(b)] =
            positions[static_cast<size_t>(b * S + S - 1)] + static_cast<int32_t>(t);
      }
      embed(weights_, next.data(), B, last.data());
      const Pass p{step_pos.data(), S + t - 1, T, mask.data()};
      LmActs a(c, B, 1);
      layers(c, weights_, p, freq, cache, a, last.data(), true, obs);
    }
    lm_head(c, weights_, last.data(), B, logits.data());
    for (int64_t b = 0; b < B; ++b) {
      next[static_cast<size_t>(b)] = greedy(logits.data() + b * V, V, banned_);
      seqs[static_cast<size_t>(b)].push_back(next[static_cast<size_t>(b)]);
    }
  }
  r.ids.reserve(static_cast<size_t>(B * T));
  for (const auto& s : seqs) r.ids.insert(r.ids.end(), s.begin(), s.end());
  r.positions.reserve(static_cast<size_t>(B * (T - 1)));
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t s = 0; s < S; ++s)
      r.positions.push_back(positions[static_cast<size_t>(b * S + s)]);
    for (int64_t t = 1; t < new_tokens; ++t)
      r.positions.push_back(positions[static_cast<size_t>(b * S + S - 1)] +
                            static_cast<int32_t>(t));
  }
  return r;
}

}  // namespace moetrace
