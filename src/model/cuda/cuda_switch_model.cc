#include "model/cuda/cuda_switch_model.h"

#include <chrono>
#include <cstring>
#include <deque>
#include <map>

#include "core/error.h"
#include "kernels/cuda/blas.h"
#include "kernels/cuda/common.h"
#include "kernels/cuda/ops.h"
#include "model/weights.h"

namespace moetrace {

using cuda::DeviceBuffer;
using cuda::Event;
using cuda::GemmArgs;
using cuda::PinnedBuffer;
using cuda::Stream;

namespace {

std::string key(int64_t block, const char* name) {
  return "enc." + std::to_string(block) + "." + name;
}

size_t align256(size_t n) { return (n + 255) / 256 * 256; }

// Uploads a [rows, cols] checkpoint matrix as `act` into dst. Bytes already in `act` go as they
// are.
void upload_matrix(const Matrix& m, DType act, void* dst, std::vector<float>& scratch,
                   std::vector<uint8_t>& conv) {
  const size_t n = static_cast<size_t>(m.rows * m.cols);
  if (m.f32.empty() && m.dtype == act) {
    MT_CUDA_CHECK(cudaMemcpy(dst, m.raw, n * dtype_size(act), cudaMemcpyHostToDevice));
    return;
  }
  const float* f = m.get(scratch);
  if (act == DType::kF32) {
    MT_CUDA_CHECK(cudaMemcpy(dst, f, n * 4, cudaMemcpyHostToDevice));
    return;
  }
  conv.resize(n * 2);
  convert_from_f32(f, act, conv.data(), n);
  MT_CUDA_CHECK(cudaMemcpy(dst, conv.data(), n * 2, cudaMemcpyHostToDevice));
}

DeviceBuffer upload_f32(const std::vector<float>& v) {
  DeviceBuffer b(std::max<size_t>(4, v.size() * 4));
  MT_CUDA_CHECK(cudaMemcpy(b.get(), v.data(), v.size() * 4, cudaMemcpyHostToDevice));
  return b;
}

// The per-batch layout of a capture slot (device staging and pinned host alike), for T tokens and L
// sparse blocks: [logits L*T*E][expert L*T i32][gate L*T f32][dropped L*T u8], each part
// 256-aligned.
struct CaptureLayout {
  size_t logits = 0, expert = 0, gate = 0, dropped = 0, hidden = 0, total = 0;
  size_t logit_bytes = 0, hidden_bytes = 0;
  CaptureLayout(const CaptureSpec& spec, int64_t T, int64_t L, int64_t E, int64_t d) {
    logit_bytes = spec.router_logits ? dtype_size(spec.logits_dtype) : 0;
    hidden_bytes = spec.hidden ? dtype_size(spec.hidden_dtype) : 0;
    const size_t lt = static_cast<size_t>(L * T);
    logits = 0;
    expert = align256(lt * static_cast<size_t>(E) * logit_bytes);
    gate = expert + align256(lt * 4);
    dropped = gate + align256(lt * 4);
    hidden = dropped + align256(lt);
    total = hidden + align256(lt * static_cast<size_t>(d) * hidden_bytes);
  }
};

}  // namespace

struct CapturedBatch::Pool {
  enum State { kFree, kInFlight, kHeld };
  std::mutex mu;
  std::condition_variable cv;
  std::vector<State> state;
  std::vector<PinnedBuffer> host;
};

CapturedBatch::~CapturedBatch() {
  if (!pool_) return;
  {
    std::lock_guard<std::mutex> lock(pool_->mu);
    pool_->state[static_cast<size_t>(slot_)] = Pool::kFree;
  }
  pool_->cv.notify_all();
}

const TensorView* CapturedBatch::find(std::string_view k) const {
  for (const auto& [name, view] : tensors)
    if (name == k) return &view;
  return nullptr;
}

struct DevBlock {
  DeviceBuffer ln_attn, ln_ff;  // f32 [d]
  DeviceBuffer qkv, o;          // act [3*inner, d], [d, inner]
  bool sparse = false;
  DeviceBuffer wi, wo;    // dense: act [F, d], [d, F]; sparse: [E, F, d], [E, d, F]
  DeviceBuffer router;    // f32 [E, d]
  int sparse_index = -1;  // position among the sparse blocks
};

struct SlotDev {
  PinnedBuffer ids, mask;  // [T] int32: the batch's inputs until its forward has read them
  DeviceBuffer staging;
  Event computed, copied;
  uint64_t ticket = 0;
  int64_t B = 0, S = 0;
  size_t bytes = 0;
};

// Device destinations of the router outputs of one forward; null members use scratch.
struct CaptureTargets {
  uint8_t* base = nullptr;
  CaptureLayout layout{CaptureSpec{}, 0, 0, 0, 0};
  CaptureSpec spec;
};

struct CudaSwitchModel::Impl {
  SwitchConfig c;
  CudaOptions opt;
  DType act = DType::kBF16;
  int64_t d = 0, H = 0, dk = 0, inner = 0, F = 0, E = 0, n_sparse = 0, capacity = 0;
  float eps = 1e-6f;
  double load_s = 0;

  std::unique_ptr<Stream> compute, copy;
  std::unique_ptr<cuda::Blas> blas;

  DeviceBuffer embed;  // [V, d] in the checkpoint's dtype (exact rows for every precision)
  DType embed_dt = DType::kF32;
  std::vector<float> rel_bias;  // [num_buckets, H] host copy
  DeviceBuffer final_ln;
  std::vector<DevBlock> blocks;
  std::map<int64_t, DeviceBuffer> bias_tables;  // per S: [H, 2S-1] f32

  // Activations, sized for cap_T tokens / cap_BHSS attention scores.
  int64_t cap_T = 0, cap_BHSS = 0, cap_BH = 0;
  DeviceBuffer ids, mask, x, h, hr, qkv, ctx, scores, probs, ffn, logits, counts, offsets, cursor,
      perm, tile_expert, tile_row, ptrs, expert_s, dropped_s, gate_s, out;

  CaptureSpec spec;
  std::shared_ptr<CapturedBatch::Pool> pool;
  std::vector<std::unique_ptr<SlotDev>> slots;
  std::deque<int> order;  // in-flight slots in submit order
  uint64_t next_ticket = 0;

  void upload_weights(const SwitchWeights& w);
  void reserve(int64_t B, int64_t S);
  const float* bias_table(int64_t S);
  void forward(int64_t B, int64_t S, Observer* obs, const CaptureTargets* cap);
  void offer(Observer* obs, const std::string& k, const void* dev, DType dt, Shape shape);
  size_t device_bytes() const;
  void configure_slots();
};

void CudaSwitchModel::Impl::upload_weights(const SwitchWeights& w) {
  std::vector<float> scratch;
  std::vector<uint8_t> conv;
  const size_t as = cuda::act_size(act);
  embed_dt = w.embed.dtype;
  embed.reserve(static_cast<size_t>(w.embed.rows * w.embed.cols) * dtype_size(embed_dt));
  MT_CUDA_CHECK(cudaMemcpy(embed.get(), w.embed.raw, embed.bytes(), cudaMemcpyHostToDevice));
  rel_bias = w.enc_rel_bias;
  final_ln = upload_f32(w.enc_final_ln);
  int sparse_index = 0;
  for (const Block& b : w.encoder) {
    DevBlock db;
    db.ln_attn = upload_f32(b.ln_attn);
    db.ln_ff = upload_f32(b.ln_ff);
    db.qkv.reserve(static_cast<size_t>(3 * inner * d) * as);
    upload_matrix(b.self_attn.qkv, act, db.qkv.get(), scratch, conv);
    db.o.reserve(static_cast<size_t>(d * inner) * as);
    upload_matrix(b.self_attn.o, act, db.o.get(), scratch, conv);
    db.sparse = b.sparse;
    if (b.sparse) {
      db.sparse_index = sparse_index++;
      if (!b.moe.bias.empty()) fail("CudaSwitchModel: router_bias is not supported on the GPU yet");
      db.router.reserve(static_cast<size_t>(E * d) * 4);
      upload_matrix(b.moe.router, DType::kF32, db.router.get(), scratch, conv);
      const size_t per = static_cast<size_t>(F * d) * as;
      db.wi.reserve(per * static_cast<size_t>(E));
      db.wo.reserve(per * static_cast<size_t>(E));
      for (int64_t e = 0; e < E; ++e) {
        const Expert& ex = b.moe.experts[static_cast<size_t>(e)];
        upload_matrix(ex.wi, act, db.wi.as<uint8_t>() + static_cast<size_t>(e) * per, scratch,
                      conv);
        upload_matrix(ex.wo, act, db.wo.as<uint8_t>() + static_cast<size_t>(e) * per, scratch,
                      conv);
      }
    } else {
      db.wi.reserve(static_cast<size_t>(F * d) * as);
      db.wo.reserve(static_cast<size_t>(F * d) * as);
      upload_matrix(b.dense.wi, act, db.wi.get(), scratch, conv);
      upload_matrix(b.dense.wo, act, db.wo.get(), scratch, conv);
    }
    blocks.push_back(std::move(db));
  }
  n_sparse = sparse_index;
}

void CudaSwitchModel::Impl::reserve(int64_t B, int64_t S) {
  const int64_t T = B * S;
  if (S > 1024) fail("CudaSwitchModel: sequence length ", S, " > 1024 is not supported");
  const size_t as = cuda::act_size(act);
  if (T > cap_T) {
    const auto t = static_cast<size_t>(T);
    ids.reserve(t * 4);
    mask.reserve(t * 4);
    x.reserve(t * d * 4);
    out.reserve(t * d * 4);
    h.reserve(t * d * as);
    hr.reserve(t * d * 4);
    qkv.reserve(t * 3 * inner * as);
    ctx.reserve(t * inner * as);
    ffn.reserve(t * F * as);
    logits.reserve(t * std::max<int64_t>(E, 1) * 4);
    perm.reserve(t * 4);
    expert_s.reserve(t * 4);
    dropped_s.reserve(t);
    gate_s.reserve(t * 4);
    const int64_t max_tiles = T / cuda::grouped_tile_m(act) + 1 + E;
    tile_expert.reserve(static_cast<size_t>(max_tiles) * 4);
    tile_row.reserve(static_cast<size_t>(max_tiles) * 4);
    counts.reserve(static_cast<size_t>(E + 1) * 4);
    offsets.reserve(static_cast<size_t>(E + 1) * 4);
    cursor.reserve(static_cast<size_t>(E + 1) * 4);
    cap_T = T;
  }
  if (!cuda::flash_attention_supported(dk, S, act) && B * H * S * S > cap_BHSS) {
    scores.reserve(static_cast<size_t>(B * H * S * S) * 4);
    probs.reserve(static_cast<size_t>(B * H * S * S) * as);
    cap_BHSS = B * H * S * S;
  }
  if (B * H > cap_BH) {
    ptrs.reserve(static_cast<size_t>(6 * B * H) * sizeof(void*));
    cap_BH = B * H;
  }
}

const float* CudaSwitchModel::Impl::bias_table(int64_t S) {
  auto it = bias_tables.find(S);
  if (it != bias_tables.end()) return it->second.as<float>();
  std::vector<float> table(static_cast<size_t>(H * (2 * S - 1)));
  for (int64_t rp = -(S - 1); rp <= S - 1; ++rp) {
    const int bucket = relative_position_bucket(rp, true, c.relative_attention_num_buckets,
                                                c.relative_attention_max_distance);
    for (int64_t hh = 0; hh < H; ++hh)
      table[hh * (2 * S - 1) + rp + S - 1] = rel_bias[bucket * H + hh];
  }
  return bias_tables.emplace(S, upload_f32(table)).first->second.as<float>();
}

void CudaSwitchModel::Impl::offer(Observer* obs, const std::string& k, const void* dev, DType dt,
                                  Shape shape) {
  if (obs == nullptr || !obs->wants(k)) return;
  Tensor t(dt, std::move(shape));
  cuda::download(t.raw(), dev, t.nbytes(), compute->get());
  obs->observe(k, t.view());
}

void CudaSwitchModel::Impl::forward(int64_t B, int64_t S, Observer* obs,
                                    const CaptureTargets* cap) {
  const int64_t T = B * S;
  cudaStream_t s = compute->get();
  const int32_t* d_ids = ids.as<int32_t>();
  const int32_t* d_mask = mask.as<int32_t>();
  float* X = x.as<float>();
  const float* bias = bias_table(S);
  const int tile_m = cuda::grouped_tile_m(act);
  const int64_t max_tiles = T / tile_m + 1 + E;

  auto** tab = ptrs.as<void*>();
  const int64_t n = B * H;
  cuda::AttentionPointers p{
      const_cast<const void**>(tab),         const_cast<const void**>(tab + n),
      const_cast<const void**>(tab + 2 * n), tab + 3 * n,
      const_cast<const void**>(tab + 4 * n), tab + 5 * n};
  // Attention: fused on the tensor cores where it applies, else batched GEMMs around a softmax.
  const bool flash = cuda::flash_attention_supported(dk, S, act);
  if (!flash)
    cuda::attention_pointers(qkv.get(), scores.as<float>(), probs.get(), ctx.get(), B, S, H, dk,
                             act, p, s);
  cuda::embed(d_ids, embed.get(), embed_dt, T, d, X, s);

  for (size_t i = 0; i < blocks.size(); ++i) {
    const DevBlock& b = blocks[i];
    const auto bi = static_cast<int64_t>(i);
    offer(obs, key(bi, "input"), X, DType::kF32, {B, S, d});
    // Self-attention: x += o(softmax(q·kᵀ + bias + mask)·v).
    cuda::rmsnorm(X, b.ln_attn.as<float>(), T, d, eps, h.get(), act, nullptr, s);
    blas->gemm_nt(
        GemmArgs{T, 3 * inner, d, h.get(), d, b.qkv.get(), d, qkv.get(), 3 * inner, act, act});
    if (flash) {
      cuda::flash_attention(qkv.get(), bias, d_mask, B, S, H, dk, ctx.get(), act, s);
    } else {
      blas->batched_nt(n, S, S, dk, p.q, 3 * inner, p.k, 3 * inner, p.scores, S, act, DType::kF32);
      cuda::attention_softmax(scores.as<float>(), bias, d_mask, false, B, H, S, S, probs.get(), act,
                              s);
      blas->batched_nn(n, S, dk, S, p.probs, S, p.v, 3 * inner, p.ctx, inner, act, act);
    }
    blas->gemm_nt(
        GemmArgs{T, d, inner, ctx.get(), inner, b.o.get(), inner, X, d, act, DType::kF32, true});
    // Feed-forward.
    cuda::rmsnorm(X, b.ln_ff.as<float>(), T, d, eps, h.get(), act,
                  b.sparse ? hr.as<float>() : nullptr, s);
    if (!b.sparse) {
      blas->gemm_nt(
          GemmArgs{T, F, d, h.get(), d, b.wi.get(), d, ffn.get(), F, act, act, false, true});
      blas->gemm_nt(GemmArgs{T, d, F, ffn.get(), F, b.wo.get(), F, X, d, act, DType::kF32, true});
      continue;
    }
    // Router: float32 logits from the float32 norm output, then softmax/top-1/capacity/gate.
    const int64_t li = b.sparse_index;
    int32_t* ex = expert_s.as<int32_t>();
    uint8_t* dr = dropped_s.as<uint8_t>();
    float* gt = gate_s.as<float>();
    uint16_t* l16 = nullptr;
    float* l32 = nullptr;
    if (cap) {
      uint8_t* base = cap->base;
      const auto lt = static_cast<size_t>(li * T);
      ex = reinterpret_cast<int32_t*>(base + cap->layout.expert) + lt;
      gt = reinterpret_cast<float*>(base + cap->layout.gate) + lt;
      dr = base + cap->layout.dropped + lt;
      if (cap->spec.router_logits) {
        uint8_t* lb =
            base + cap->layout.logits + lt * static_cast<size_t>(E) * cap->layout.logit_bytes;
        if (cap->spec.logits_dtype == DType::kF16)
          l16 = reinterpret_cast<uint16_t*>(lb);
        else
          l32 = reinterpret_cast<float*>(lb);
      }
    }
    float* L = l32 ? l32 : logits.as<float>();
    blas->gemm_nt(
        GemmArgs{T, E, d, hr.get(), d, b.router.get(), d, L, E, DType::kF32, DType::kF32});
    MT_CUDA_CHECK(cudaMemsetAsync(counts.get(), 0, static_cast<size_t>(E) * 4, s));
    cuda::moe_route(L, B, S, E, capacity, act, ex, dr, gt, counts.as<int32_t>(), l16, s);
    if (cap && cap->spec.hidden)
      cuda::convert_f32(hr.as<float>(), T * d,
                        cap->base + cap->layout.hidden +
                            static_cast<size_t>(li * T * d) * cap->layout.hidden_bytes,
                        cap->spec.hidden_dtype, s);
    offer(obs, key(bi, "hidden"), hr.get(), DType::kF32, {B, S, d});
    offer(obs, key(bi, "router_logits"), L, DType::kF32, {B, S, E});
    offer(obs, key(bi, "expert"), ex, DType::kI32, {B, S});
    offer(obs, key(bi, "dropped"), dr, DType::kU8, {B, S});
    offer(obs, key(bi, "gate"), gt, DType::kF32, {B, S});
    // Experts: permute by expert on the device, grouped GEMMs, gate + un-permute fused into x.
    cuda::moe_plan(counts.as<int32_t>(), E, tile_m, max_tiles, offsets.as<int32_t>(),
                   tile_expert.as<int32_t>(), tile_row.as<int32_t>(), cursor.as<int32_t>(), s);
    cuda::moe_permute(ex, dr, T, offsets.as<int32_t>(), cursor.as<int32_t>(), perm.as<int32_t>(),
                      s);
    cuda::grouped_gemm(h.get(), d, true, perm.as<int32_t>(), b.wi.get(), F, d,
                       tile_expert.as<int32_t>(), tile_row.as<int32_t>(), offsets.as<int32_t>(),
                       max_tiles, cuda::GroupedEpilogue::kRelu, ffn.get(), F, nullptr, act, s);
    cuda::grouped_gemm(ffn.get(), F, false, perm.as<int32_t>(), b.wo.get(), d, F,
                       tile_expert.as<int32_t>(), tile_row.as<int32_t>(), offsets.as<int32_t>(),
                       max_tiles, cuda::GroupedEpilogue::kGateResidual, X, d, gt, act, s);
  }
  cuda::rmsnorm(X, final_ln.as<float>(), T, d, eps, out.get(), DType::kF32, nullptr, s);
  offer(obs, "enc.output", out.get(), DType::kF32, {B, S, d});
}

size_t CudaSwitchModel::Impl::device_bytes() const {
  size_t n = embed.bytes() + final_ln.bytes();
  for (const auto& b : blocks)
    n += b.ln_attn.bytes() + b.ln_ff.bytes() + b.qkv.bytes() + b.o.bytes() + b.wi.bytes() +
         b.wo.bytes() + b.router.bytes();
  for (const auto& [S, t] : bias_tables) n += t.bytes();
  for (const DeviceBuffer* b :
       {&ids,      &mask, &x,        &h,         &hr,      &qkv,    &ctx,  &scores,
        &probs,    &ffn,  &logits,   &counts,    &offsets, &cursor, &perm, &tile_expert,
        &tile_row, &ptrs, &expert_s, &dropped_s, &gate_s,  &out})
    n += b->bytes();
  for (const auto& sl : slots) n += sl->staging.bytes();
  return n;
}

void CudaSwitchModel::Impl::configure_slots() {
  auto p = std::make_shared<CapturedBatch::Pool>();
  p->state.assign(static_cast<size_t>(spec.slots), CapturedBatch::Pool::kFree);
  p->host.resize(static_cast<size_t>(spec.slots));
  pool = std::move(p);
  slots.clear();
  for (int i = 0; i < spec.slots; ++i) slots.push_back(std::make_unique<SlotDev>());
}

// ---- public
// --------------------------------------------------------------------------------------

CudaSwitchModel::CudaSwitchModel(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
CudaSwitchModel::~CudaSwitchModel() {
  if (impl_ && impl_->compute) (void)cudaStreamSynchronize(impl_->compute->get());
  if (impl_ && impl_->copy) (void)cudaStreamSynchronize(impl_->copy->get());
}

std::unique_ptr<CudaSwitchModel> CudaSwitchModel::load(const std::filesystem::path& dir,
                                                       const LoadOptions& load,
                                                       const CudaOptions& options) {
  SwitchConfig config = load_config(dir / "config.json");
  std::shared_ptr<TensorSource> source = open_checkpoint(dir);
  return from_source(std::move(config), std::move(source), load, options);
}

std::unique_ptr<CudaSwitchModel> CudaSwitchModel::from_source(SwitchConfig config,
                                                              std::shared_ptr<TensorSource> source,
                                                              const LoadOptions& load,
                                                              const CudaOptions& options) {
  const auto t0 = std::chrono::steady_clock::now();
  if (options.precision != DType::kF32 && options.precision != DType::kBF16 &&
      options.precision != DType::kF16)
    fail("CudaSwitchModel: precision must be F32, BF16 or F16, not ",
         dtype_name(options.precision));
  if (!cuda::device_available()) fail("CudaSwitchModel: no CUDA device available");
  MT_CUDA_CHECK(cudaSetDevice(options.device));
  auto impl = std::make_unique<Impl>();
  Impl& m = *impl;
  m.c = std::move(config);
  m.opt = options;
  m.act = options.precision;
  m.d = m.c.d_model;
  m.H = m.c.num_heads;
  m.dk = m.c.d_kv;
  m.inner = m.H * m.dk;
  m.F = m.c.d_ff;
  m.E = m.c.num_experts;
  m.capacity = m.c.expert_capacity;
  m.eps = static_cast<float>(m.c.layer_norm_epsilon);
  if (m.d % 8 || m.F % 8 || m.inner % 8)
    fail("CudaSwitchModel: d_model, d_ff and num_heads*d_kv must be multiples of 8 (got ", m.d,
         ", ", m.F, ", ", m.inner, ")");
  if (m.E > 256) fail("CudaSwitchModel: at most 256 experts on the GPU (config has ", m.E, ")");
  m.compute = std::make_unique<Stream>();
  m.copy = std::make_unique<Stream>();
  m.blas = std::make_unique<cuda::Blas>(m.compute->get());
  // The GPU runs the encoder only: map (and check) just its tensors; expert weights stay mapped.
  WeightOptions wo;
  wo.encoder_only = true;
  wo.f32_expert_budget_bytes = 0;
  (void)load;
  const SwitchWeights w = map_weights(m.c, *source, wo);
  m.upload_weights(w);
  m.configure_slots();
  MT_CUDA_CHECK(cudaDeviceSynchronize());
  m.load_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return std::unique_ptr<CudaSwitchModel>(new CudaSwitchModel(std::move(impl)));
}

const SwitchConfig& CudaSwitchModel::config() const { return impl_->c; }
DType CudaSwitchModel::precision() const { return impl_->act; }
size_t CudaSwitchModel::device_bytes() const { return impl_->device_bytes(); }
double CudaSwitchModel::load_seconds() const { return impl_->load_s; }
void CudaSwitchModel::reserve(int64_t B, int64_t S) { impl_->reserve(B, S); }

Tensor CudaSwitchModel::encode(const Batch& batch, Observer* obs) {
  Impl& m = *impl_;
  const int64_t B = batch.B, S = batch.S, T = B * S;
  if (static_cast<int64_t>(batch.input_ids.size()) != T ||
      static_cast<int64_t>(batch.attention_mask.size()) != T)
    fail("CudaSwitchModel::encode: batch of ", B, "x", S, " has ", batch.input_ids.size(),
         " ids and ", batch.attention_mask.size(), " mask values");
  for (int64_t i = 0; i < T; ++i)
    if (batch.input_ids[i] < 0 || batch.input_ids[i] >= m.c.vocab_size)
      fail("input_ids[", i, "] = ", batch.input_ids[i], " is outside the vocabulary [0, ",
           m.c.vocab_size, ")");
  m.reserve(B, S);
  MT_CUDA_CHECK(cudaMemcpyAsync(m.ids.get(), batch.input_ids.data(), T * 4, cudaMemcpyHostToDevice,
                                m.compute->get()));
  MT_CUDA_CHECK(cudaMemcpyAsync(m.mask.get(), batch.attention_mask.data(), T * 4,
                                cudaMemcpyHostToDevice, m.compute->get()));
  m.forward(B, S, obs, nullptr);
  Tensor out(DType::kF32, {B, S, m.d});
  cuda::download(out.raw(), m.out.get(), out.nbytes(), m.compute->get());
  return out;
}

void CudaSwitchModel::set_capture(const CaptureSpec& spec) {
  Impl& m = *impl_;
  if (!m.order.empty()) fail("CudaSwitchModel::set_capture: batches are in flight");
  {
    std::lock_guard<std::mutex> lock(m.pool->mu);
    for (auto st : m.pool->state)
      if (st != CapturedBatch::Pool::kFree)
        fail("CudaSwitchModel::set_capture: captured batches are still held");
  }
  if (spec.slots < 1) fail("CudaSwitchModel::set_capture: slots must be >= 1");
  if (spec.hidden && spec.hidden_dtype != DType::kF32 && spec.hidden_dtype != DType::kBF16 &&
      spec.hidden_dtype != DType::kF16)
    fail("CudaSwitchModel::set_capture: hidden dtype must be F32, BF16 or F16");
  if (spec.router_logits && spec.logits_dtype != DType::kF16 && spec.logits_dtype != DType::kF32)
    fail("CudaSwitchModel::set_capture: logits dtype must be F16 or F32");
  m.spec = spec;
  m.configure_slots();
}

int CudaSwitchModel::in_flight() const { return static_cast<int>(impl_->order.size()); }
int CudaSwitchModel::slots() const { return impl_->spec.slots; }

uint64_t CudaSwitchModel::submit(const Batch& batch) {
  Impl& m = *impl_;
  const int64_t B = batch.B, S = batch.S, T = B * S;
  if (static_cast<int64_t>(batch.input_ids.size()) != T ||
      static_cast<int64_t>(batch.attention_mask.size()) != T)
    fail("CudaSwitchModel::submit: batch of ", B, "x", S, " has ", batch.input_ids.size(), " ids");
  for (int64_t i = 0; i < T; ++i)
    if (batch.input_ids[i] < 0 || batch.input_ids[i] >= m.c.vocab_size)
      fail("input_ids[", i, "] = ", batch.input_ids[i], " is outside the vocabulary [0, ",
           m.c.vocab_size, ")");
  int k = -1;
  {
    std::unique_lock<std::mutex> lock(m.pool->mu);
    for (;;) {
      bool held = false;
      for (size_t i = 0; i < m.pool->state.size(); ++i) {
        if (m.pool->state[i] == CapturedBatch::Pool::kFree) {
          k = static_cast<int>(i);
          break;
        }
        held |= m.pool->state[i] == CapturedBatch::Pool::kHeld;
      }
      if (k >= 0) break;
      if (!held)
        fail("CudaSwitchModel::submit: all ", m.spec.slots, " slots are in flight; poll() first");
      m.pool->cv.wait(lock);
    }
    m.pool->state[static_cast<size_t>(k)] = CapturedBatch::Pool::kInFlight;
  }
  SlotDev& sl = *m.slots[static_cast<size_t>(k)];
  cudaStream_t s = m.compute->get();
  m.reserve(B, S);
  const CaptureLayout layout(m.spec, T, m.n_sparse, m.E, m.d);
  sl.ids.reserve(static_cast<size_t>(T) * 4);
  sl.mask.reserve(static_cast<size_t>(T) * 4);
  std::memcpy(sl.ids.get(), batch.input_ids.data(), static_cast<size_t>(T) * 4);
  std::memcpy(sl.mask.get(), batch.attention_mask.data(), static_cast<size_t>(T) * 4);
  sl.staging.reserve(layout.total);
  m.pool->host[static_cast<size_t>(k)].reserve(layout.total);
  // The slot's staging area is rewritten only after its previous copy to the host finished.
  MT_CUDA_CHECK(cudaStreamWaitEvent(s, sl.copied.get(), 0));
  MT_CUDA_CHECK(cudaMemcpyAsync(m.ids.get(), sl.ids.get(), T * 4, cudaMemcpyHostToDevice, s));
  MT_CUDA_CHECK(cudaMemcpyAsync(m.mask.get(), sl.mask.get(), T * 4, cudaMemcpyHostToDevice, s));
  CaptureTargets cap;
  cap.base = sl.staging.as<uint8_t>();
  cap.layout = layout;
  cap.spec = m.spec;
  m.forward(B, S, nullptr, &cap);
  sl.computed.record(s);
  MT_CUDA_CHECK(cudaStreamWaitEvent(m.copy->get(), sl.computed.get(), 0));
  MT_CUDA_CHECK(cudaMemcpyAsync(m.pool->host[static_cast<size_t>(k)].get(), sl.staging.get(),
                                layout.total, cudaMemcpyDeviceToHost, m.copy->get()));
  sl.copied.record(m.copy->get());
  sl.ticket = m.next_ticket++;
  sl.B = B;
  sl.S = S;
  sl.bytes = layout.total;
  m.order.push_back(k);
  return sl.ticket;
}

std::unique_ptr<CapturedBatch> CudaSwitchModel::poll(bool wait) {
  Impl& m = *impl_;
  if (m.order.empty()) return nullptr;
  const int k = m.order.front();
  SlotDev& sl = *m.slots[static_cast<size_t>(k)];
  if (wait)
    sl.copied.sync();
  else if (!sl.copied.done())
    return nullptr;
  m.order.pop_front();
  {
    std::lock_guard<std::mutex> lock(m.pool->mu);
    m.pool->state[static_cast<size_t>(k)] = CapturedBatch::Pool::kHeld;
  }
  std::unique_ptr<CapturedBatch> r(new CapturedBatch(m.pool, k));
  r->ticket = sl.ticket;
  r->B = sl.B;
  r->S = sl.S;
  const int64_t T = sl.B * sl.S;
  const CaptureLayout layout(m.spec, T, m.n_sparse, m.E, m.d);
  const auto* base = static_cast<const uint8_t*>(m.pool->host[static_cast<size_t>(k)].get());
  for (const DevBlock& b : m.blocks) {
    if (!b.sparse) continue;
    const int64_t bi = &b - m.blocks.data();
    const auto lt = static_cast<size_t>(b.sparse_index * T);
    if (m.spec.router_logits)
      r->tensors.emplace_back(
          key(bi, "router_logits"),
          TensorView{m.spec.logits_dtype,
                     {sl.B, sl.S, m.E},
                     base + layout.logits + lt * static_cast<size_t>(m.E) * layout.logit_bytes});
    if (m.spec.expert)
      r->tensors.emplace_back(key(bi, "expert"),
                              TensorView{DType::kI32, {sl.B, sl.S}, base + layout.expert + lt * 4});
    if (m.spec.dropped)
      r->tensors.emplace_back(key(bi, "dropped"),
                              TensorView{DType::kU8, {sl.B, sl.S}, base + layout.dropped + lt});
    if (m.spec.hidden)
      r->tensors.emplace_back(
          key(bi, "hidden"),
          TensorView{m.spec.hidden_dtype,
                     {sl.B, sl.S, m.d},
                     base + layout.hidden + lt * static_cast<size_t>(m.d) * layout.hidden_bytes});
    if (m.spec.gate)
      r->tensors.emplace_back(key(bi, "gate"),
                              TensorView{DType::kF32, {sl.B, sl.S}, base + layout.gate + lt * 4});
  }
  return r;
}

}  // namespace moetrace
