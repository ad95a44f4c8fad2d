#include "model/cuda/cuda_lm_model.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>

#include "core/error.h"
#include "core/keys.h"
#include "kernels/cpu/ops.h"
#include "kernels/cuda/blas.h"
#include "kernels/cuda/common.h"
#include "kernels/cuda/ops.h"
#include "model/cuda/observation_tap.h"
#include "model/engine_io.h"
#include "model/lm/lm_forward.h"
#include "model/recording_observer.h"

namespace moetrace {

using cuda::DeviceBuffer;
using cuda::GemmArgs;
using cuda::PinnedBuffer;
using cuda::Stream;

namespace {

// Where a pass's observed tensors go: the GPU engines' one mechanism (now for prompt passes, staged
// for generation steps).
class LmTap : public ObservationTap {
 public:
  LmTap(Observer* obs, cudaStream_t stream, PinnedBuffer* staging)
      : ObservationTap(obs, stream, staging, "CudaLmModel") {}
};

// n float32 values into dst (device) as `act`.
void put_act(const float* f, size_t n, DType act, void* dst, std::vector<uint8_t>& conv) {
  if (n == 0) return;
  if (act == DType::kF32) {
    MT_CUDA_CHECK(cudaMemcpy(dst, f, n * 4, cudaMemcpyHostToDevice));
    return;
  }
  conv.resize(n * 2);
  convert_from_f32(f, act, conv.data(), n);
  MT_CUDA_CHECK(cudaMemcpy(dst, conv.data(), n * 2, cudaMemcpyHostToDevice));
}

DeviceBuffer upload_f32(const std::vector<float>& v) {
  DeviceBuffer b;
  if (v.empty()) return b;
  b.reserve(v.size() * 4);
  MT_CUDA_CHECK(cudaMemcpy(b.get(), v.data(), v.size() * 4, cudaMemcpyHostToDevice));
  return b;
}

// A SwiGLU MLP's gate and up [F, d] as one [2F, d] matrix in act, rows interleaved (2f = gate_f,
// 2f + 1 = up_f: the layout of the grouped GEMM's SwiGLU epilogue and of cuda::swiglu).
void put_gate_up(const LmMlp& m, DType act, void* dst, std::vector<float>& inter,
                 std::vector<uint8_t>& conv) {
  std::vector<float> sg, su;
  const int64_t F = m.gate.rows, d = m.gate.cols;
  const float* g = m.gate.get(sg);
  const float* u = m.up.get(su);
  inter.resize(static_cast<size_t>(2 * F * d));
  for (int64_t f = 0; f < F; ++f) {
    std::copy_n(g + f * d, d, inter.data() + (2 * f) * d);
    std::copy_n(u + f * d, d, inter.data() + (2 * f + 1) * d);
  }
  put_act(inter.data(), inter.size(), act, dst, conv);
}

void put_matrix(const Matrix& m, DType act, void* dst, std::vector<float>& scratch,
                std::vector<uint8_t>& conv) {
  const size_t n = static_cast<size_t>(m.rows * m.cols);
  if (m.f32.empty() && m.dtype == act) {
    MT_CUDA_CHECK(cudaMemcpy(dst, m.raw, n * dtype_size(act), cudaMemcpyHostToDevice));
    return;
  }
  put_act(m.get(scratch), n, act, dst, conv);
}

cuda::QkNormKind qk_kind(QkNorm n) {
  switch (n) {
    case QkNorm::kFull:
      return cuda::QkNormKind::kFull;
    case QkNorm::kPerHead:
      return cuda::QkNormKind::kPerHead;
    case QkNorm::kNone:
      break;
  }
  return cuda::QkNormKind::kNone;
}

void check_mask(const Batch& batch, std::string_view what) {
  for (size_t i = 0; i < batch.attention_mask.size(); ++i) {
    const int32_t m = batch.attention_mask[i];
    if (m != 0 && m != 1) fail(what, ": attention_mask[", i, "] = ", m, " (expected 0 or 1)");
  }
}

}  // namespace

std::vector<int32_t> lm_generate_positions(const Batch& batch) {
  std::vector<int32_t> pos(static_cast<size_t>(batch.B * batch.S));
  for (int64_t b = 0; b < batch.B; ++b) {
    int32_t seen = 0;
    for (int64_t s = 0; s < batch.S; ++s) {
      const int32_t m = batch.attention_mask[static_cast<size_t>(b * batch.S + s)];
      seen += m != 0 ? 1 : 0;
      pos[static_cast<size_t>(b * batch.S + s)] = m != 0 ? seen - 1 : 0;
    }
  }
  return pos;
}

// One decoder layer's weights on the device.
struct LmDevLayer {
  DeviceBuffer input_norm, post_norm;  // f32 [d]
  DeviceBuffer qkv;                    // act [(H + 2*KV)*hd, d]: q, k, v stacked
  DeviceBuffer qkv_bias;               // f32 [(H + 2*KV)*hd] or empty
  DeviceBuffer q_norm, k_norm;         // f32, see LmAttention, or empty
  DeviceBuffer o;                      // act [d, H*hd]
  DeviceBuffer o_bias;                 // f32 [d] or empty
  bool sparse = false;
  DeviceBuffer gate_up, down;  // sparse: act [E, 2F, d] (interleaved), [E, d, F]; dense: [2Fd, d],
                               // [d, Fd]
  DeviceBuffer router;         // f32 [E, d]
  bool shared = false;
  DeviceBuffer shared_gate_up, shared_down;  // act [2Fs, d] (interleaved), [d, Fs]
  DeviceBuffer shared_gate;                  // f32 [1, d]
  size_t bytes() const {
    size_t n = 0;
    for (const DeviceBuffer* b :
         {&input_norm, &post_norm, &qkv, &qkv_bias, &q_norm, &k_norm, &o, &o_bias, &gate_up, &down,
          &router, &shared_gate_up, &shared_down, &shared_gate})
      n += b->bytes();
    return n;
  }
};

struct CudaLmModel::Impl {
  LmConfig c;
  CudaOptions opt;
  DType act = DType::kBF16;
  int64_t d = 0, H = 0, KV = 0, hd = 0, qn = 0, kn = 0, cols = 0, E = 0, k = 0, F = 0, Fs = 0,
          Fd = 0, V = 0, L = 0;
  float eps = 1e-6f, clip = 0.f, q_scale = 1.f;
  cuda::QkNormKind qk = cuda::QkNormKind::kNone;
  std::vector<int64_t> banned;
  double load_s = 0;

  std::unique_ptr<Stream> stream;
  std::unique_ptr<cuda::Blas> blas;
  DeviceBuffer embed;  // [V, d] in embed_dt (exact rows in every precision)
  DType embed_dt = DType::kF32;
  DeviceBuffer final_norm;  // f32 [d]
  DeviceBuffer lm_head_own;
  const void* lm_head = nullptr;  // act [V, d]
  std::vector<LmDevLayer> layers;
  DeviceBuffer rope_cos, rope_sin;  // f32 [rope_P, hd/2]
  int64_t rope_P = 0;
  DeviceBuffer banned_dev;  // i32 [n_banned]: the banned ids inside the vocabulary
  int64_t n_banned = 0;

  // Activations for up to cap_n token rows.
  int64_t cap_n = 0;
  DeviceBuffer x;       // f32 [n, d] residual stream
  DeviceBuffer h;       // act [n, d] norm output (GEMM operand)
  DeviceBuffer hr;      // f32 [n, d] norm output (router input; lm.output)
  DeviceBuffer qkv32;   // f32 [n, cols] the q|k|v projection
  DeviceBuffer q, ctx;  // act [n, H*hd]
  DeviceBuffer gu32;    // f32 [n, 2*max(Fd, Fs)] dense / shared gate|up
  DeviceBuffer mid;     // act [max(n*k*F, n*Fd, n*Fs)] SwiGLU outputs
  DeviceBuffer logits;  // f32 [n, E] router logits
  DeviceBuffer expert;  // i32 [n, k]
  DeviceBuffer weight;  // f32 [n, k]
  DeviceBuffer counts, offsets, cursor, perm, tile_e, tile_r;  // i32 MoE plan
  DeviceBuffer rows;          // f32 [n*k, d] one expert output per slot
  DeviceBuffer shared_out;    // f32 [n, d]
  DeviceBuffer shared_gate;   // f32 [n]
  DeviceBuffer vocab_logits;  // f32 [rows, V]
  int64_t cap_vocab_rows = 0;
  // Inputs and caches.
  DeviceBuffer ids, pos, mask, kv_cache, last_idx, last_x, next_ids, finished;
  // The prompt's batched attention: scores f32 / probs act [B,H,S,S], the prompt mask [B,S] and the
  // pointer tables of the per-(b,h) GEMMs: [scores B*H][probs B*H], then per layer [q][k][v][ctx].
  LmPromptAttention prompt_attention = LmPromptAttention::kAuto;
  bool batched = false;  // this prompt pass uses them
  DeviceBuffer scores, probs, pmask, att_ptrs;
  std::vector<const void*> host_ptrs;
  PinnedBuffer step_ids, step_obs;
  PinnedBuffer prompt_obs;  // the prompt pass's observations (staged: no synchronization per layer)

  void init_dims();
  void upload(const LmModel& m);
  void randomize(uint64_t seed);
  void check_fits(size_t weight_bytes) const;
  size_t weight_bytes() const;
  void reserve(int64_t n);
  void ensure_rope(int64_t P);
  void upload_banned();
  // Every layer over n = B*Sq rows whose embeddings are in x: new positions t0..t0+Sq-1 of a cache
  // of Smax; pos [B*Sq] on the device (pos_dev), mask [B, Smax] in `mask`.
  void layers_pass(int64_t B, int64_t Sq, int64_t t0, int64_t Smax, const int32_t* pos_dev,
                   LmTap& tap, bool gen);
  void moe(const LmDevLayer& Ly, int64_t n);
  // Prepares the batched prompt attention for B x S (batched = true) where it applies.
  void prepare_batched(const Batch& batch, int64_t Smax);
  void batched_attention(int64_t i, int64_t B, int64_t S);
  // The prompt: ids, positions and the mask [B, Smax] (prompt mask, then ones) uploaded, embedded,
  // every layer (lm.* keys).
  void prompt(const Batch& batch, const std::vector<int32_t>& positions, int64_t Smax, LmTap& tap);
  // vocab_logits [n, V] = lm_head · rmsnorm(xin [n, d]); the float32 normed rows into hr.
  void head(const float* xin, int64_t n);
  size_t device_bytes() const;
  // A tap for a pass of B x Sq rows staging, in pinned memory, every key obs wants (lm.* or gen.*,
  // and lm.output when `output`): the copies run on the stream, offered at flush().
  LmTap staged_tap(Observer* obs, PinnedBuffer& staging, int64_t B, int64_t Sq, bool gen,
                   bool output);
};

LmTap CudaLmModel::Impl::staged_tap(Observer* obs, PinnedBuffer& staging, int64_t B, int64_t Sq,
                                    bool gen, bool output) {
  if (obs == nullptr) return LmTap(nullptr, stream->get(), nullptr);
  const auto n = static_cast<size_t>(B * Sq);
  size_t bytes = 256;
  for (int blk : c.sparse_layers()) {
    auto add = [&](std::string_view field, size_t per_row) {
      if (obs->wants(lm_key(gen, blk, field))) bytes += align256(n * per_row);
    };
    add(keys::kHidden, static_cast<size_t>(d) * 4);
    add(keys::kRouterLogits, static_cast<size_t>(E) * 4);
    add(keys::kExpert, static_cast<size_t>(k) * 4);
    add(keys::kGate, static_cast<size_t>(k) * 4);
  }
  if (output && obs->wants("lm.output")) bytes += align256(n * static_cast<size_t>(d) * 4);
  staging.reserve(bytes);
  return LmTap(obs, stream->get(), &staging);
}

void CudaLmModel::Impl::init_dims() {
  d = c.hidden_size;
  H = c.num_attention_heads;
  KV = c.num_key_value_heads;
  hd = c.head_dim;
  qn = H * hd;
  kn = KV * hd;
  cols = qn + 2 * kn;
  E = c.num_experts;
  k = c.top_k;
  F = c.moe_intermediate_size;
  Fs = c.shared_expert_intermediate_size;
  Fd = c.intermediate_size;
  V = c.vocab_size;
  L = c.num_hidden_layers;
  eps = static_cast<float>(c.rms_norm_eps);
  clip = static_cast<float>(c.clip_qkv);
  q_scale = static_cast<float>(std::pow(static_cast<double>(hd), -0.5));
  qk = qk_kind(c.qk_norm);
  auto m8 = [&](int64_t v, const char* name) {
    if (v % 8 != 0)
      fail("CudaLmModel: ", name, " = ", v, " must be a multiple of 8 on the GPU (", c.summary(),
           ")");
  };
  m8(d, "hidden_size");
  if (!c.sparse_layers().empty()) m8(F, "moe_intermediate_size");
  if (Fs > 0) m8(Fs, "shared_expert_intermediate_size");
  if (static_cast<int64_t>(c.sparse_layers().size()) < L) m8(Fd, "intermediate_size");
  if (E > 256) fail("CudaLmModel: at most 256 experts on the GPU (config has ", E, ")");
  if (k > 32 || k > E) fail("CudaLmModel: top_k ", k, " must be <= 32 and <= ", E, " experts");
  if (hd % 2 != 0 || hd > 256) fail("CudaLmModel: head_dim ", hd, " must be even and <= 256");
  if (cols > 12288)
    fail("CudaLmModel: (heads + 2*kv_heads)*head_dim = ", cols, " > 12288 is not supported");
}

size_t CudaLmModel::Impl::weight_bytes() const {
  const size_t as = cuda::act_size(act);
  size_t n = static_cast<size_t>(V * d) * (dtype_size(embed_dt) + (c.tie_word_embeddings ? 0 : as));
  for (int64_t i = 0; i < L; ++i) {
    n += static_cast<size_t>(cols * d + d * qn) * as;
    if (c.layer_sparse(i)) {
      n += static_cast<size_t>(E * 3 * F * d) * as + static_cast<size_t>(E * d) * 4;
      if (Fs > 0) n += static_cast<size_t>(3 * Fs * d) * as;
    } else {
      n += static_cast<size_t>(3 * Fd * d) * as;
    }
  }
  return n;
}

// Models larger than the device: one clear error with the size needed, before any allocation.
void CudaLmModel::Impl::check_fits(size_t need) const {
  size_t free_b = 0, total_b = 0;
  MT_CUDA_CHECK(cudaMemGetInfo(&free_b, &total_b));
  auto gib = [](size_t b) { return static_cast<double>(b) / (1024.0 * 1024 * 1024); };
  if (need > free_b)
    fail("CudaLmModel: the weights need ", gib(need), " GiB in ", dtype_option_name(act), " but ",
         cuda::device_name(), " has ", gib(free_b), " GiB free (", c.summary(),
         "); a smaller precision or a larger GPU is needed (weights are not streamed from the "
         "host)");
}

void CudaLmModel::Impl::upload(const LmModel& model) {
  const LmWeights& w = model.weights();
  const size_t as = cuda::act_size(act);
  std::vector<float> scratch, inter;
  std::vector<uint8_t> conv;
  embed_dt = w.embed.dtype;
  if (embed_dt != DType::kF32 && embed_dt != DType::kBF16 && embed_dt != DType::kF16)
    fail("CudaLmModel: embedding dtype ", dtype_name(embed_dt), " (expected F32, BF16 or F16)");
  check_fits(weight_bytes());
  embed.reserve(static_cast<size_t>(w.embed.rows * w.embed.cols) * dtype_size(embed_dt));
  MT_CUDA_CHECK(cudaMemcpy(embed.get(), w.embed.raw, embed.bytes(), cudaMemcpyHostToDevice));
  final_norm = upload_f32(w.final_norm);
  if (c.tie_word_embeddings && embed_dt == act) {
    lm_head = embed.get();
  } else {
    lm_head_own.reserve(static_cast<size_t>(V * d) * as);
    put_matrix(w.lm_head, act, lm_head_own.get(), scratch, conv);
    lm_head = lm_head_own.get();
  }
  for (int64_t i = 0; i < L; ++i) {
    const LmLayer& src = w.layers[static_cast<size_t>(i)];
    LmDevLayer Ly;
    Ly.input_norm = upload_f32(src.input_norm);
    Ly.post_norm = upload_f32(src.post_attn_norm);
    Ly.qkv.reserve(static_cast<size_t>(cols * d) * as);
    put_matrix(src.attn.q, act, Ly.qkv.get(), scratch, conv);
    put_matrix(src.attn.k, act, Ly.qkv.as<uint8_t>() + static_cast<size_t>(qn * d) * as, scratch,
               conv);
    put_matrix(src.attn.v, act, Ly.qkv.as<uint8_t>() + static_cast<size_t>((qn + kn) * d) * as,
               scratch, conv);
    if (!src.attn.q_bias.empty() || !src.attn.k_bias.empty() || !src.attn.v_bias.empty()) {
      std::vector<float> bias(static_cast<size_t>(cols), 0.f);
      std::copy(src.attn.q_bias.begin(), src.attn.q_bias.end(), bias.begin());
      std::copy(src.attn.k_bias.begin(), src.attn.k_bias.end(), bias.begin() + qn);
      std::copy(src.attn.v_bias.begin(), src.attn.v_bias.end(), bias.begin() + qn + kn);
      Ly.qkv_bias = upload_f32(bias);
    }
    Ly.q_norm = upload_f32(src.attn.q_norm);
    Ly.k_norm = upload_f32(src.attn.k_norm);
    Ly.o.reserve(static_cast<size_t>(d * qn) * as);
    put_matrix(src.attn.o, act, Ly.o.get(), scratch, conv);
    Ly.o_bias = upload_f32(src.attn.o_bias);
    Ly.sparse = src.sparse;
    if (src.sparse) {
      const LmMoe& m = src.moe;
      if (static_cast<int64_t>(m.experts.size()) != E || m.experts[0].gate.rows != F)
        fail("CudaLmModel: layer ", i, " has ", m.experts.size(), " experts of width ",
             m.experts.empty() ? 0 : m.experts[0].gate.rows, ", config says ", E, " of ", F);
      Ly.router.reserve(static_cast<size_t>(E * d) * 4);
      put_matrix(m.router, DType::kF32, Ly.router.get(), scratch, conv);
      const size_t per = static_cast<size_t>(F * d) * as;
      Ly.gate_up.reserve(2 * per * static_cast<size_t>(E));
      Ly.down.reserve(per * static_cast<size_t>(E));
      for (int64_t e = 0; e < E; ++e) {
        const LmMlp& ex = m.experts[static_cast<size_t>(e)];
        put_gate_up(ex, act, Ly.gate_up.as<uint8_t>() + static_cast<size_t>(e) * 2 * per, inter,
                    conv);
        put_matrix(ex.down, act, Ly.down.as<uint8_t>() + static_cast<size_t>(e) * per, scratch,
                   conv);
      }
      Ly.shared = m.has_shared;
      if (m.has_shared) {
        Ly.shared_gate_up.reserve(static_cast<size_t>(2 * Fs * d) * as);
        put_gate_up(m.shared, act, Ly.shared_gate_up.get(), inter, conv);
        Ly.shared_down.reserve(static_cast<size_t>(d * Fs) * as);
        put_matrix(m.shared.down, act, Ly.shared_down.get(), scratch, conv);
        Ly.shared_gate.reserve(static_cast<size_t>(d) * 4);
        put_matrix(m.shared_gate, DType::kF32, Ly.shared_gate.get(), scratch, conv);
      }
    } else {
      Ly.gate_up.reserve(static_cast<size_t>(2 * Fd * d) * as);
      put_gate_up(src.dense, act, Ly.gate_up.get(), inter, conv);
      Ly.down.reserve(static_cast<size_t>(d * Fd) * as);
      put_matrix(src.dense.down, act, Ly.down.get(), scratch, conv);
    }
    layers.push_back(std::move(Ly));
  }
}

void CudaLmModel::Impl::randomize(uint64_t seed) {
  const size_t as = cuda::act_size(act);
  cudaStream_t s = stream->get();
  embed_dt = act;
  check_fits(weight_bytes());
  uint64_t next = seed;
  // U(-a, a) with a = sqrt(3 / fan_in): unit-variance outputs for unit-variance inputs.
  auto fill = [&](DeviceBuffer& b, int64_t n, DType dt, int64_t fan_in) {
    b.reserve(static_cast<size_t>(n) * dtype_size(dt));
    const auto a = static_cast<float>(std::sqrt(3.0 / static_cast<double>(fan_in)));
    cuda::fill_uniform(b.get(), n, dt, next++, -a, a, s);
  };
  auto ones = [&](DeviceBuffer& b, int64_t n) {
    b.reserve(static_cast<size_t>(n) * 4);
    cuda::fill_uniform(b.get(), n, DType::kF32, 0, 1.f, 1.f, s);
  };
  fill(embed, V * d, act, 3);  // U(-1, 1)
  ones(final_norm, d);
  if (c.tie_word_embeddings) {
    lm_head = embed.get();
  } else {
    fill(lm_head_own, V * d, act, d);
    lm_head = lm_head_own.get();
  }
  for (int64_t i = 0; i < L; ++i) {
    LmDevLayer Ly;
    ones(Ly.input_norm, d);
    ones(Ly.post_norm, d);
    fill(Ly.qkv, cols * d, act, d);
    if (qk == cuda::QkNormKind::kFull) {
      ones(Ly.q_norm, qn);
      ones(Ly.k_norm, kn);
    } else if (qk == cuda::QkNormKind::kPerHead) {
      ones(Ly.q_norm, hd);
      ones(Ly.k_norm, hd);
    }
    fill(Ly.o, d * qn, act, qn);
    Ly.sparse = c.layer_sparse(i);
    if (Ly.sparse) {
      fill(Ly.router, E * d, DType::kF32, d);
      fill(Ly.gate_up, E * 2 * F * d, act, d);
      fill(Ly.down, E * d * F, act, F);
      Ly.shared = Fs > 0;
      if (Ly.shared) {
        fill(Ly.shared_gate_up, 2 * Fs * d, act, d);
        fill(Ly.shared_down, d * Fs, act, Fs);
        fill(Ly.shared_gate, d, DType::kF32, d);
      }
    } else {
      fill(Ly.gate_up, 2 * Fd * d, act, d);
      fill(Ly.down, d * Fd, act, Fd);
    }
    layers.push_back(std::move(Ly));
  }
  (void)as;
  stream->sync();
}

void CudaLmModel::Impl::upload_banned() {
  std::vector<int32_t> ids;
  for (int64_t b : banned)
    if (b >= 0 && b < V) ids.push_back(static_cast<int32_t>(b));
  n_banned = static_cast<int64_t>(ids.size());
  banned_dev.reserve(std::max<size_t>(4, ids.size() * 4));
  if (!ids.empty())
    MT_CUDA_CHECK(cudaMemcpy(banned_dev.get(), ids.data(), ids.size() * 4, cudaMemcpyHostToDevice));
}

void CudaLmModel::Impl::reserve(int64_t n) {
  if (n <= cap_n) return;
  const auto t = static_cast<size_t>(n);
  const size_t as = cuda::act_size(act);
  // The dense / shared gate|up width, where the model has one.
  const bool dense = static_cast<int64_t>(c.sparse_layers().size()) < L;
  const int64_t Fw = std::max(dense ? Fd : 0, Fs);
  x.reserve(t * d * 4);
  h.reserve(t * d * as);
  hr.reserve(t * d * 4);
  qkv32.reserve(t * cols * 4);
  q.reserve(t * qn * as);
  ctx.reserve(t * qn * as);
  gu32.reserve(std::max<size_t>(4, t * 2 * Fw * 4));
  const int64_t mid_n = std::max({n * k * F, dense ? n * Fd : 0, n * Fs});
  mid.reserve(std::max<size_t>(4, static_cast<size_t>(mid_n) * as));
  logits.reserve(std::max<size_t>(4, t * E * 4));
  expert.reserve(std::max<size_t>(4, t * k * 4));
  weight.reserve(std::max<size_t>(4, t * k * 4));
  perm.reserve(std::max<size_t>(4, t * k * 4));
  const int64_t max_tiles = n * k / cuda::grouped_tile_m(act) + 1 + E;
  tile_e.reserve(static_cast<size_t>(max_tiles) * 4);
  tile_r.reserve(static_cast<size_t>(max_tiles) * 4);
  counts.reserve(static_cast<size_t>(E + 1) * 4);
  offsets.reserve(static_cast<size_t>(E + 1) * 4);
  cursor.reserve(static_cast<size_t>(E + 1) * 4);
  rows.reserve(std::max<size_t>(4, t * k * d * 4));
  if (Fs > 0) {
    shared_out.reserve(t * d * 4);
    shared_gate.reserve(t * 4);
  }
  ids.reserve(t * 4);
  pos.reserve(t * 4);
  cap_n = n;
}

void CudaLmModel::Impl::ensure_rope(int64_t P) {
  if (P <= rope_P) return;
  P = (P + 255) / 256 * 256;
  std::vector<float> co, si;
  cpu::rope_table(rope_inv_freq(c), P, co, si);
  stream->sync();  // the old tables may still be read
  rope_cos = upload_f32(co);
  rope_sin = upload_f32(si);
  rope_P = P;
}

void CudaLmModel::Impl::moe(const LmDevLayer& Ly, int64_t n) {
  cudaStream_t s = stream->get();
  // Router: float32 logits of the float32 norm output, then softmax / top-k / renormalization.
  blas->gemm_nt(GemmArgs{n, E, d, hr.get(), d, Ly.router.get(), d, logits.get(), E, DType::kF32,
                         DType::kF32});
  MT_CUDA_CHECK(cudaMemsetAsync(counts.get(), 0, static_cast<size_t>(E) * 4, s));
  cuda::moe_topk(logits.as<float>(), n, E, k, c.norm_topk_prob, expert.as<int32_t>(),
                 weight.as<float>(), counts.as<int32_t>(), s);
  // The n*k (token, slot) pairs by expert; one output row per slot.
  const int64_t slots = n * k;
  const int tile_m = cuda::grouped_tile_m(act);
  const int64_t max_tiles = slots / tile_m + 1 + E;
  cuda::moe_plan(counts.as<int32_t>(), E, tile_m, max_tiles, offsets.as<int32_t>(),
                 tile_e.as<int32_t>(), tile_r.as<int32_t>(), cursor.as<int32_t>(), s);
  cuda::moe_permute(expert.as<int32_t>(), nullptr, slots, offsets.as<int32_t>(),
                    cursor.as<int32_t>(), perm.as<int32_t>(), s);
  cuda::grouped_gemm(h.get(), d, true, perm.as<int32_t>(), Ly.gate_up.get(), 2 * F, d,
                     tile_e.as<int32_t>(), tile_r.as<int32_t>(), offsets.as<int32_t>(), max_tiles,
                     cuda::GroupedEpilogue::kSwiGlu, mid.get(), F, nullptr, act, s, k);
  cuda::grouped_gemm(mid.get(), F, false, perm.as<int32_t>(), Ly.down.get(), d, F,
                     tile_e.as<int32_t>(), tile_r.as<int32_t>(), offsets.as<int32_t>(), max_tiles,
                     cuda::GroupedEpilogue::kRows, rows.get(), d, nullptr, act, s);
  const float* sh = nullptr;
  const float* sg = nullptr;
  if (Ly.shared) {  // qwen2_moe: sigmoid(h · w_gate) · down(swiglu(gate|up · h))
    blas->gemm_nt(GemmArgs{n, 2 * Fs, d, h.get(), d, Ly.shared_gate_up.get(), d, gu32.get(), 2 * Fs,
                           act, DType::kF32});
    cuda::swiglu(gu32.as<float>(), n, Fs, mid.get(), act, s);
    blas->gemm_nt(GemmArgs{n, d, Fs, mid.get(), Fs, Ly.shared_down.get(), Fs, shared_out.get(), d,
                           act, DType::kF32});
    // The gate's logits as one row [1, n] = w [1, d] · hrᵀ (a GEMV-shaped GEMM, not N = 1).
    blas->gemm_nt(GemmArgs{1, n, d, Ly.shared_gate.get(), d, hr.get(), d, shared_gate.get(), n,
                           DType::kF32, DType::kF32});
    sh = shared_out.as<float>();
    sg = shared_gate.as<float>();
  }
  cuda::moe_combine(rows.as<float>(), weight.as<float>(), n, k, d, sh, sg, act, x.as<float>(), s);
}

void CudaLmModel::Impl::layers_pass(int64_t B, int64_t Sq, int64_t t0, int64_t Smax,
                                    const int32_t* pos_dev, LmTap& tap, bool gen) {
  const int64_t n = B * Sq, ldkv = 2 * kn;
  const size_t as = cuda::act_size(act);
  cudaStream_t s = stream->get();
  float* X = x.as<float>();
  for (int64_t i = 0; i < L; ++i) {
    const LmDevLayer& Ly = layers[static_cast<size_t>(i)];
    // Attention: x += o(attention(rope(norms(q|k|v of rmsnorm(x))))); k, v into the cache.
    cuda::rmsnorm(X, Ly.input_norm.as<float>(), n, d, eps, h.get(), act, nullptr, s);
    blas->gemm_nt(
        GemmArgs{n, cols, d, h.get(), d, Ly.qkv.get(), d, qkv32.get(), cols, act, DType::kF32});
    uint8_t* cache = kv_cache.as<uint8_t>() + static_cast<size_t>(i * B * Smax * ldkv) * as;
    cuda::lm_qkv_rope(qkv32.as<float>(), Ly.qkv_bias.as<float>(), clip, qk, Ly.q_norm.as<float>(),
                      Ly.k_norm.as<float>(), eps, pos_dev, rope_cos.as<float>(),
                      rope_sin.as<float>(), q_scale, B, Sq, H, KV, hd, q.get(), qn, cache, ldkv,
                      Smax * ldkv, t0, act, s);
    if (batched && Sq > 1) {
      batched_attention(i, B, Sq);
    } else {
      cuda::lm_attention(q.get(), qn, cache, cache + static_cast<size_t>(kn) * as, ldkv,
                         Smax * ldkv, mask.as<int32_t>(), Smax, c.sliding_window, B, H, KV, Sq,
                         t0 + Sq, hd, ctx.get(), qn, act, s);
    }
    blas->gemm_nt(GemmArgs{n, d, qn, ctx.get(), qn, Ly.o.get(), qn, X, d, act, DType::kF32, true});
    if (Ly.o_bias.bytes() > 0) cuda::add_bias(X, Ly.o_bias.as<float>(), n, d, s);
    // MLP: x += mlp(rmsnorm(x)); a MoE layer keeps the float32 norm output (its router input).
    cuda::rmsnorm(X, Ly.post_norm.as<float>(), n, d, eps, h.get(), act,
                  Ly.sparse ? hr.as<float>() : nullptr, s);
    if (!Ly.sparse) {
      blas->gemm_nt(GemmArgs{n, 2 * Fd, d, h.get(), d, Ly.gate_up.get(), d, gu32.get(), 2 * Fd, act,
                             DType::kF32});
      cuda::swiglu(gu32.as<float>(), n, Fd, mid.get(), act, s);
      blas->gemm_nt(
          GemmArgs{n, d, Fd, mid.get(), Fd, Ly.down.get(), Fd, X, d, act, DType::kF32, true});
      continue;
    }
    moe(Ly, n);
    tap.put(lm_key(gen, i, keys::kHidden), hr.get(), DType::kF32, {B, Sq, d});
    tap.put(lm_key(gen, i, keys::kRouterLogits), logits.get(), DType::kF32, {B, Sq, E});
    tap.put(lm_key(gen, i, keys::kExpert), expert.get(), DType::kI32, {B, Sq, k});
    tap.put(lm_key(gen, i, keys::kGate), weight.get(), DType::kF32, {B, Sq, k});
  }
}

// The prompt's attention as three batched steps per layer: scores = q·kᵀ (float32, q pre-scaled),
// attention_softmax (causal, the prompt's padding mask, probs in act), ctx = probs·v; query head h
// reads kv head h / (H/KV) through the pointer tables. Where S <= 1024 and there is no sliding
// window; lm_attention otherwise (and for every generation step).
void CudaLmModel::Impl::prepare_batched(const Batch& batch, int64_t Smax) {
  const int64_t B = batch.B, S = batch.S, n = B * H, ldkv = 2 * kn, G = H / KV;
  const size_t as = cuda::act_size(act);
  const auto ss = static_cast<size_t>(n * S * S);
  // The [B,H,S,S] scores and probs within 4 GiB (a larger batch attends with lm_attention).
  batched = prompt_attention == LmPromptAttention::kAuto && S > 1 && S <= 1024 &&
            c.sliding_window == 0 && ss * (4 + as) <= (size_t{4} << 30);
  if (!batched) return;
  scores.reserve(ss * 4);
  probs.reserve(ss * as);
  pmask.reserve(static_cast<size_t>(B * S) * 4);
  // [scores n][probs n], then per layer [q n][k n][v n][ctx n].
  host_ptrs.assign(static_cast<size_t>((2 + 4 * L) * n), nullptr);
  const auto* qb = q.as<uint8_t>();
  const auto* cb = ctx.as<uint8_t>();
  for (int64_t e = 0; e < n; ++e) {
    host_ptrs[static_cast<size_t>(e)] = scores.as<uint8_t>() + static_cast<size_t>(e) * S * S * 4;
    host_ptrs[static_cast<size_t>(n + e)] =
        probs.as<uint8_t>() + static_cast<size_t>(e) * S * S * as;
  }
  for (int64_t i = 0; i < L; ++i) {
    const uint8_t* cache = kv_cache.as<uint8_t>() + static_cast<size_t>(i * B * Smax * ldkv) * as;
    const void** tab = host_ptrs.data() + (2 + 4 * i) * n;
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t hh = 0; hh < H; ++hh) {
        const int64_t e = b * H + hh;
        const uint8_t* kr = cache + static_cast<size_t>(b * Smax * ldkv + (hh / G) * hd) * as;
        tab[e] = qb + static_cast<size_t>(b * S * qn + hh * hd) * as;
        tab[n + e] = kr;
        tab[2 * n + e] = kr + static_cast<size_t>(kn) * as;
        tab[3 * n + e] = cb + static_cast<size_t>(b * S * qn + hh * hd) * as;
      }
    }
  }
  att_ptrs.reserve(host_ptrs.size() * sizeof(void*));
  // Synchronous copies: nothing on the stream reads these buffers now (every pass ends with a
  // synchronization).
  MT_CUDA_CHECK(cudaMemcpy(att_ptrs.get(), host_ptrs.data(), host_ptrs.size() * sizeof(void*),
                           cudaMemcpyHostToDevice));
  MT_CUDA_CHECK(cudaMemcpy(pmask.get(), batch.attention_mask.data(), static_cast<size_t>(B * S) * 4,
                           cudaMemcpyHostToDevice));
}

void CudaLmModel::Impl::batched_attention(int64_t i, int64_t B, int64_t S) {
  const int64_t n = B * H, ldkv = 2 * kn;
  void* const* all = att_ptrs.as<void*>();
  void* const* tab = all + (2 + 4 * i) * n;
  auto in = [](void* const* p) { return const_cast<const void* const*>(p); };
  blas->batched_nt(n, S, S, hd, in(tab), qn, in(tab + n), ldkv, all, S, act, DType::kF32);
  cuda::attention_softmax(scores.as<float>(), nullptr, pmask.as<int32_t>(), true, B, H, S, S,
                          probs.get(), act, stream->get());
  blas->batched_nn(n, S, hd, S, in(all + n), S, in(tab + 2 * n), ldkv, tab + 3 * n, qn, act, act);
}

void CudaLmModel::Impl::prompt(const Batch& batch, const std::vector<int32_t>& positions,
                               int64_t Smax, LmTap& tap) {
  const int64_t B = batch.B, S = batch.S, n = B * S;
  const size_t as = cuda::act_size(act);
  cudaStream_t s = stream->get();
  reserve(n);
  int32_t max_pos = 0;
  for (int32_t p : positions) max_pos = std::max(max_pos, p);
  ensure_rope(static_cast<int64_t>(max_pos) + (Smax - S) + 1);
  std::vector<int32_t> m(static_cast<size_t>(B * Smax), 1);
  for (int64_t b = 0; b < B; ++b)
    std::copy_n(batch.attention_mask.begin() + b * S, S, m.begin() + b * Smax);
  mask.reserve(m.size() * 4);
  kv_cache.reserve(static_cast<size_t>(L * B * Smax * 2 * kn) * as);
  prepare_batched(batch, Smax);  // after the buffers its tables point into are sized
  MT_CUDA_CHECK(cudaMemcpyAsync(mask.get(), m.data(), m.size() * 4, cudaMemcpyHostToDevice, s));
  MT_CUDA_CHECK(cudaMemcpyAsync(ids.get(), batch.input_ids.data(), static_cast<size_t>(n) * 4,
                                cudaMemcpyHostToDevice, s));
  MT_CUDA_CHECK(cudaMemcpyAsync(pos.get(), positions.data(), static_cast<size_t>(n) * 4,
                                cudaMemcpyHostToDevice, s));
  cuda::embed(ids.as<int32_t>(), embed.get(), embed_dt, n, d, x.as<float>(), s);
  layers_pass(B, S, 0, Smax, pos.as<int32_t>(), tap, false);
  // The host vectors above must outlive their asynchronous copies.
  MT_CUDA_CHECK(cudaStreamSynchronize(s));
}

void CudaLmModel::Impl::head(const float* xin, int64_t n) {
  cudaStream_t s = stream->get();
  if (n > cap_vocab_rows) {
    vocab_logits.reserve(static_cast<size_t>(n * V) * 4);
    cap_vocab_rows = n;
  }
  MT_ASSERT(n <= cap_n);  // hr holds the normed rows
  cuda::rmsnorm(xin, final_norm.as<float>(), n, d, eps, h.get(), act, hr.as<float>(), s);
  blas->gemm_nt(GemmArgs{n, V, d, h.get(), d, lm_head, d, vocab_logits.get(), V, act, DType::kF32});
}

size_t CudaLmModel::Impl::device_bytes() const {
  size_t n = embed.bytes() + final_norm.bytes() + lm_head_own.bytes() + rope_cos.bytes() +
             rope_sin.bytes() + banned_dev.bytes();
  for (const LmDevLayer& Ly : layers) n += Ly.bytes();
  for (const DeviceBuffer* b :
       {&x,        &h,      &hr,     &qkv32,    &q,          &ctx,         &gu32,
        &mid,      &logits, &expert, &weight,   &counts,     &offsets,     &cursor,
        &perm,     &tile_e, &tile_r, &rows,     &shared_out, &shared_gate, &vocab_logits,
        &ids,      &pos,    &mask,   &kv_cache, &last_idx,   &last_x,      &next_ids,
        &finished, &scores, &probs,  &pmask,    &att_ptrs})
    n += b->bytes();
  return n;
}

// ---- public -------------------------------------------------------------------------------------

CudaLmModel::CudaLmModel(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
CudaLmModel::~CudaLmModel() {
  if (impl_ && impl_->stream) (void)cudaStreamSynchronize(impl_->stream->get());
}

namespace {

std::unique_ptr<CudaLmModel::Impl> make_impl(const LmConfig& config, const CudaOptions& options) {
  if (options.precision != DType::kF32 && options.precision != DType::kBF16 &&
      options.precision != DType::kF16)
    fail("CudaLmModel: precision must be F32, BF16 or F16, not ", dtype_name(options.precision));
  if (!cuda::device_available()) fail("CudaLmModel: no CUDA device available");
  MT_CUDA_CHECK(cudaSetDevice(options.device));
  auto m = std::make_unique<CudaLmModel::Impl>();
  m->c = config;
  m->opt = options;
  m->act = options.precision;
  m->init_dims();
  m->stream = std::make_unique<Stream>();
  m->blas = std::make_unique<cuda::Blas>(m->stream->get());
  return m;
}

}  // namespace

std::unique_ptr<CudaLmModel> CudaLmModel::load(const std::filesystem::path& dir,
                                               const CudaOptions& options) {
  WeightOptions wo;
  wo.f32_expert_budget_bytes = 0;  // experts stay mapped: uploaded as they are or converted
  const std::unique_ptr<LmModel> model = LmModel::load(dir, wo);
  return from_model(*model, options);
}

std::unique_ptr<CudaLmModel> CudaLmModel::from_model(const LmModel& model,
                                                     const CudaOptions& options) {
  const auto t0 = std::chrono::steady_clock::now();
  auto m = make_impl(model.config(), options);
  m->banned = model.banned_ids();
  m->upload(model);
  m->upload_banned();
  MT_CUDA_CHECK(cudaDeviceSynchronize());
  m->load_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return std::unique_ptr<CudaLmModel>(new CudaLmModel(std::move(m)));
}

std::unique_ptr<CudaLmModel> CudaLmModel::random(const LmConfig& config, const CudaOptions& options,
                                                 uint64_t seed) {
  const auto t0 = std::chrono::steady_clock::now();
  auto m = make_impl(config, options);
  m->banned = config.eos_token_ids;
  m->randomize(seed);
  m->upload_banned();
  MT_CUDA_CHECK(cudaDeviceSynchronize());
  m->load_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return std::unique_ptr<CudaLmModel>(new CudaLmModel(std::move(m)));
}

const LmConfig& CudaLmModel::config() const { return impl_->c; }
DType CudaLmModel::precision() const { return impl_->act; }
size_t CudaLmModel::device_bytes() const { return impl_->device_bytes(); }
double CudaLmModel::load_seconds() const { return impl_->load_s; }
const std::vector<int64_t>& CudaLmModel::banned_ids() const { return impl_->banned; }
void CudaLmModel::set_prompt_attention(LmPromptAttention a) { impl_->prompt_attention = a; }
void CudaLmModel::set_banned_ids(std::vector<int64_t> ids) {
  impl_->banned = std::move(ids);
  impl_->upload_banned();
}

Tensor CudaLmModel::forward(const Batch& batch, Observer* obs) {
  Impl& m = *impl_;
  check_batch(batch, m.V, "CudaLmModel::forward");
  check_mask(batch, "CudaLmModel::forward");
  const int64_t B = batch.B, S = batch.S, n = B * S;
  if (S > cuda::kDecodeMaxKeys)
    fail("CudaLmModel::forward: sequence length ", S, " > ", cuda::kDecodeMaxKeys);
  std::vector<int32_t> positions(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) positions[static_cast<size_t>(i)] = static_cast<int32_t>(i % S);
  LmTap tap = m.staged_tap(obs, m.prompt_obs, B, S, false, true);
  m.prompt(batch, positions, S, tap);
  m.head(m.x.as<float>(), n);
  tap.put("lm.output", m.hr.get(), DType::kF32, {B, S, m.d});
  Tensor logits(DType::kF32, {B, S, m.V});
  cuda::download(logits.raw(), m.vocab_logits.get(), logits.nbytes(), m.stream->get());
  tap.flush();
  return logits;
}

void CudaLmModel::prefill(const Batch& batch, Observer* obs) {
  Impl& m = *impl_;
  check_batch(batch, m.V, "CudaLmModel::prefill");
  check_mask(batch, "CudaLmModel::prefill");
  const int64_t S = batch.S, n = batch.B * S;
  if (S > cuda::kDecodeMaxKeys)
    fail("CudaLmModel::prefill: sequence length ", S, " > ", cuda::kDecodeMaxKeys);
  std::vector<int32_t> positions(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) positions[static_cast<size_t>(i)] = static_cast<int32_t>(i % S);
  LmTap tap = m.staged_tap(obs, m.prompt_obs, batch.B, S, false, false);
  m.prompt(batch, positions, S, tap);
  tap.flush();
}

LmGenerateResult CudaLmModel::generate(const Batch& batch, int64_t new_tokens, Observer* obs) {
  Impl& m = *impl_;
  check_batch(batch, m.V, "CudaLmModel::generate");
  check_mask(batch, "CudaLmModel::generate");
  if (new_tokens < 1) fail("generate: the number of new tokens must be >= 1, got ", new_tokens);
  const int64_t B = batch.B, S = batch.S, d = m.d, V = m.V, Smax = S + new_tokens;
  if (Smax > cuda::kDecodeMaxKeys)
    fail("CudaLmModel::generate: prompt + new tokens = ", Smax, " > ", cuda::kDecodeMaxKeys);
  cudaStream_t s = m.stream->get();
  const std::vector<int32_t> positions = lm_generate_positions(batch);
  {
    LmTap tap = m.staged_tap(obs, m.prompt_obs, B, S, false, false);
    m.prompt(batch, positions, Smax, tap);
    tap.flush();
  }
  // Step t >= 1 feeds token t - 1 at cache index S + t - 1, position p_b + t (p_b: the prompt's
  // position of column S - 1).
  std::vector<int32_t> step_pos(static_cast<size_t>(std::max<int64_t>(new_tokens - 1, 1) * B));
  for (int64_t t = 1; t < new_tokens; ++t)
    for (int64_t b = 0; b < B; ++b)
      step_pos[static_cast<size_t>((t - 1) * B + b)] =
          positions[static_cast<size_t>(b * S + S - 1)] + static_cast<int32_t>(t);
  DeviceBuffer step_pos_dev(step_pos.size() * 4);
  MT_CUDA_CHECK(
      cudaMemcpy(step_pos_dev.get(), step_pos.data(), step_pos.size() * 4, cudaMemcpyHostToDevice));
  std::vector<int32_t> last(static_cast<size_t>(B));
  for (int64_t b = 0; b < B; ++b)
    last[static_cast<size_t>(b)] = static_cast<int32_t>(b * S + S - 1);
  m.last_idx.reserve(static_cast<size_t>(B) * 4);
  m.last_x.reserve(static_cast<size_t>(B * d) * 4);
  m.next_ids.reserve(static_cast<size_t>(B) * 4);
  m.finished.reserve(static_cast<size_t>(B));
  m.step_ids.reserve(static_cast<size_t>(B) * 4);
  MT_CUDA_CHECK(cudaMemcpy(m.last_idx.get(), last.data(), last.size() * 4, cudaMemcpyHostToDevice));
  MT_CUDA_CHECK(cudaMemsetAsync(m.finished.get(), 0, static_cast<size_t>(B), s));
  cuda::gather_rows(m.x.as<float>(), m.last_idx.as<int32_t>(), B, d, m.last_x.as<float>(), s);

  std::vector<std::vector<int32_t>> seqs(static_cast<size_t>(B));
  for (int64_t b = 0; b < B; ++b)
    seqs[static_cast<size_t>(b)].assign(batch.input_ids.begin() + b * S,
                                        batch.input_ids.begin() + (b + 1) * S);
  LmTap tap = m.staged_tap(obs, m.step_obs, B, 1, true, false);
  for (int64_t t = 0; t < new_tokens; ++t) {
    const float* xin = m.last_x.as<float>();
    if (t > 0) {  // one cached step over the token chosen last
      cuda::embed(m.next_ids.as<int32_t>(), m.embed.get(), m.embed_dt, B, d, m.x.as<float>(), s);
      m.layers_pass(B, 1, S + t - 1, Smax, step_pos_dev.as<int32_t>() + (t - 1) * B, tap, true);
      xin = m.x.as<float>();
    }
    m.head(xin, B);
    cuda::ban_tokens(m.vocab_logits.as<float>(), B, V, m.banned_dev.as<int32_t>(), m.n_banned, s);
    // The first maximum (no eos bookkeeping: exactly new_tokens tokens, banned ids excluded).
    cuda::greedy_pick(m.vocab_logits.as<float>(), B, V, -1, -1, 0, m.finished.as<uint8_t>(),
                      m.next_ids.as<int32_t>(), s);
    MT_CUDA_CHECK(cudaMemcpyAsync(m.step_ids.get(), m.next_ids.get(), static_cast<size_t>(B) * 4,
                                  cudaMemcpyDeviceToHost, s));
    tap.flush();
    for (int64_t b = 0; b < B; ++b)
      seqs[static_cast<size_t>(b)].push_back(m.step_ids.as<int32_t>()[b]);
  }
  LmGenerateResult r;
  r.B = B;
  r.S = S;
  r.new_tokens = new_tokens;
  r.ids.reserve(static_cast<size_t>(B * Smax));
  for (const auto& q : seqs) r.ids.insert(r.ids.end(), q.begin(), q.end());
  r.positions.reserve(static_cast<size_t>(B * (Smax - 1)));
  for (int64_t b = 0; b < B; ++b) {
    r.positions.insert(r.positions.end(), positions.begin() + b * S,
                       positions.begin() + (b + 1) * S);
    for (int64_t t = 1; t < new_tokens; ++t)
      r.positions.push_back(step_pos[static_cast<size_t>((t - 1) * B + b)]);
  }
  return r;
}

std::map<std::string, Tensor> run_lm_forward(CudaLmModel& model, const ForwardInputs& in,
                                             int64_t generate) {
  return run_lm_forward(
      model.config(), [&](const Batch& b, Observer* obs) { return model.forward(b, obs); },
      [&](const Batch& b, int64_t n, Observer* obs) { return model.generate(b, n, obs); }, in,
      generate);
}

}  // namespace moetrace
