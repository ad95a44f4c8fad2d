#include "model/cuda/cuda_switch_model.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <deque>
#include <map>
#include <optional>

#include "core/error.h"
#include "core/keys.h"
#include "kernels/cuda/blas.h"
#include "kernels/cuda/common.h"
#include "kernels/cuda/ops.h"
#include "model/cuda/observation_tap.h"
#include "model/weights.h"

namespace moetrace {

using cuda::DeviceBuffer;
using cuda::Event;
using cuda::GemmArgs;
using cuda::PinnedBuffer;
using cuda::Stream;

namespace {

std::string key(int64_t block, std::string_view field) {
  return keys::tensor(keys::Stack::kEncoder, static_cast<int>(block), field);
}
std::string dec_key(int64_t block, std::string_view field) {
  return keys::tensor(keys::Stack::kDecoder, static_cast<int>(block), field);
}

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

// What the pipeline copies to the host for every sparse encoder block i, as a submit()'s request
// asks for it (spec_of below).
struct CaptureSpec {
  bool router_logits = false;        // enc.{i}.router_logits [B,S,E]
  DType logits_dtype = DType::kF32;  // kF16 (half the bytes) or kF32
  bool expert = false;               // enc.{i}.expert [B,S] I32
  bool dropped = false;              // enc.{i}.dropped [B,S] U8
  bool gate = false;                 // enc.{i}.gate [B,S] F32
  bool hidden = false;               // enc.{i}.hidden [B,S,d]: the router input (RMS-normed)
  DType hidden_dtype = DType::kF32;  // kF32, kBF16 or kF16
};

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

// The pipeline's slot states and pinned host buffers, shared with the batches handed out (a batch
// keeps them alive and frees its slot when destroyed, from any thread).
struct SlotPool {
  enum State { kFree, kInFlight, kHeld };
  std::mutex mu;
  std::condition_variable cv;
  std::vector<State> state;
  std::vector<PinnedBuffer> host;
};

// A finished pipeline batch: views into its slot's pinned host memory.
class SlotBatch : public CapturedBatch {
 public:
  SlotBatch(std::shared_ptr<SlotPool> pool, int slot) : pool_(std::move(pool)), slot_(slot) {}
  ~SlotBatch() override {
    {
      std::lock_guard<std::mutex> lock(pool_->mu);
      pool_->state[static_cast<size_t>(slot_)] = SlotPool::kFree;
    }
    pool_->cv.notify_all();
  }

 private:
  std::shared_ptr<SlotPool> pool_;
  int slot_;
};

struct DevBlock {
  DeviceBuffer ln_attn, ln_ff;    // f32 [d]
  DeviceBuffer qkv, o;            // act [3*inner, d], [d, inner]
  DeviceBuffer ln_cross;          // decoder: f32 [d]
  DeviceBuffer cross_q, cross_o;  // decoder: act [inner, d], [d, inner] (k, v: Impl::cross_kv_w)
  bool sparse = false;
  DeviceBuffer wi, wo;    // dense: act [F, d], [d, F]; sparse: [E, F, d], [E, d, F]
  DeviceBuffer router;    // f32 [E, d]
  int sparse_index = -1;  // position among the sparse blocks
};

namespace {

// Activations and MoE scratch of one stack's forward, for up to `cap` token rows.
struct Acts {
  int64_t cap = 0;
  DeviceBuffer x;                      // f32 [n, d]: the residual stream
  DeviceBuffer h;                      // act [n, d]: norm output (GEMM operand)
  DeviceBuffer hr;                     // f32 [n, d]: norm output of a sparse block (router input)
  DeviceBuffer qkv;                    // act [n, 3*inner] (the decoder uses [n, inner] for q)
  DeviceBuffer ctx;                    // act [n, inner]
  DeviceBuffer ffn;                    // act [n, F]
  DeviceBuffer logits;                 // f32 [n, E]: router logits
  DeviceBuffer expert, dropped, gate;  // [n] i32 / u8 / f32
  DeviceBuffer counts, offsets, cursor, perm, tile_expert, tile_row;  // i32 MoE plan

  void reserve(int64_t n, int64_t d, int64_t inner, int64_t F, int64_t E, DType act) {
    if (n <= cap) return;
    const auto t = static_cast<size_t>(n);
    const size_t as = cuda::act_size(act);
    x.reserve(t * d * 4);
    h.reserve(t * d * as);
    hr.reserve(t * d * 4);
    qkv.reserve(t * 3 * inner * as);
    ctx.reserve(t * inner * as);
    ffn.reserve(t * F * as);
    logits.reserve(t * std::max<int64_t>(E, 1) * 4);
    expert.reserve(t * 4);
    dropped.reserve(t);
    gate.reserve(t * 4);
    perm.reserve(t * 4);
    const int64_t max_tiles = n / cuda::grouped_tile_m(act) + 1 + E;
    tile_expert.reserve(static_cast<size_t>(max_tiles) * 4);
    tile_row.reserve(static_cast<size_t>(max_tiles) * 4);
    counts.reserve(static_cast<size_t>(E + 1) * 4);
    offsets.reserve(static_cast<size_t>(E + 1) * 4);
    cursor.reserve(static_cast<size_t>(E + 1) * 4);
    cap = n;
  }
  size_t bytes() const {
    size_t n = 0;
    for (const DeviceBuffer* b : {&x, &h, &hr, &qkv, &ctx, &ffn, &logits, &expert, &dropped, &gate,
                                  &counts, &offsets, &cursor, &perm, &tile_expert, &tile_row})
      n += b->bytes();
    return n;
  }
};

// Where a sparse layer's router writes (device pointers); logits_f16 may be null.
struct RouterOut {
  float* logits;
  uint16_t* logits_f16;
  int32_t* expert;
  uint8_t* dropped;
  float* gate;
};

// Where one pass's observed tensors go: the GPU engines' one observation mechanism
// (model/cuda/observation_tap.h: now and staged), plus
//  slot:   written by the router straight into a pipeline slot's device staging area in the
//          request's dtypes (submit()); poll() hands it back, nothing is offered.
class Tap : public ObservationTap {
 public:
  static Tap now(Observer* obs, cudaStream_t stream) { return Tap(obs, stream, nullptr); }
  static Tap staged(Observer* obs, cudaStream_t stream, PinnedBuffer* staging) {
    return Tap(obs, stream, staging);
  }
  static Tap slot(uint8_t* base, const CaptureLayout& layout, const CaptureSpec& spec, int64_t E,
                  cudaStream_t stream) {
    Tap t(nullptr, stream, nullptr);
    t.slot_ = base;
    t.layout_ = layout;
    t.spec_ = spec;
    t.E_ = E;
    return t;
  }

  // Slot: where the router of the li-th sparse block writes for T tokens (the slot's areas; the
  // scratch ones of `r` otherwise).
  RouterOut router_out(int64_t li, int64_t T, RouterOut r) const {
    if (slot_ == nullptr) return r;
    const auto lt = static_cast<size_t>(li * T);
    r.expert = reinterpret_cast<int32_t*>(slot_ + layout_.expert) + lt;
    r.gate = reinterpret_cast<float*>(slot_ + layout_.gate) + lt;
    r.dropped = slot_ + layout_.dropped + lt;
    if (spec_.router_logits) {
      uint8_t* lb = slot_ + layout_.logits + lt * static_cast<size_t>(E_) * layout_.logit_bytes;
      if (spec_.logits_dtype == DType::kF16)
        r.logits_f16 = reinterpret_cast<uint16_t*>(lb);
      else
        r.logits = reinterpret_cast<float*>(lb);
    }
    return r;
  }
  // Slot: the li-th sparse block's router input hr [T, d] f32, converted into the slot.
  void router_input(int64_t li, int64_t T, int64_t d, const float* hr) const {
    if (slot_ == nullptr || !spec_.hidden) return;
    cuda::convert_f32(
        hr, T * d, slot_ + layout_.hidden + static_cast<size_t>(li * T * d) * layout_.hidden_bytes,
        spec_.hidden_dtype, stream());
  }

 private:
  Tap(Observer* obs, cudaStream_t stream, PinnedBuffer* staging)
      : ObservationTap(obs, stream, staging, "CudaSwitchModel") {}
  uint8_t* slot_ = nullptr;
  CaptureLayout layout_{CaptureSpec{}, 0, 0, 0, 0};
  CaptureSpec spec_;
  int64_t E_ = 0;
};

}  // namespace

struct SlotDev {
  PinnedBuffer ids, mask;  // [T] int32: the batch's inputs until its forward has read them
  DeviceBuffer staging;
  Event computed, copied;
  uint64_t ticket = 0;
  int64_t B = 0, S = 0;
  size_t bytes = 0;
  CaptureSpec spec;  // what its request asked for
};

struct CudaSwitchModel::Impl {
  SwitchConfig c;
  CudaOptions opt;
  DType act = DType::kBF16;
  bool pairs = false;  // opt.fp32.attention_pairs in a bf16/f16 run (Fp32Parts)
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

  // Encoder activations, sized for cap_T tokens / cap_BHSS attention scores.
  int64_t cap_T = 0, cap_BHSS = 0, cap_BH = 0;
  Acts enc;
  DeviceBuffer ctx_pair;  // with pairs: act [cap_T, 2*inner], the attention output's hi | lo
  DeviceBuffer ids, mask, scores, probs, ptrs, out;
  // The batch whose encoder output `out` holds (set by encode(); submit() and a growing reserve()
  // overwrite `out`): generate()/decode() without an explicit encoder output read it.
  bool enc_valid = false;
  uint64_t enc_id = 0, encodes = 0;  // the Encoded::id of `out`; encode() calls so far
  std::vector<int32_t> enc_ids, enc_mask;

  // Decoder weights (when loaded with encoder_only = false).
  bool has_decoder = false;
  std::vector<DevBlock> dec_blocks;
  DeviceBuffer cross_kv_w;    // act [L*2*inner, d]: every block's EncDecAttention k, v stacked
  DeviceBuffer dec_final_ln;  // f32 [d], times d_model^-0.5 when the LM head is tied (folded in)
  std::vector<float> dec_rel_bias;                  // [num_buckets, H] host copy
  std::map<int64_t, DeviceBuffer> dec_bias_tables;  // per cache length Tmax: [H, Tmax] by distance
  DeviceBuffer lm_head_own;                         // act [V, d] unless it aliases `embed`
  const void* lm_head = nullptr;
  // Decoder activations and state.
  Acts dec;
  DeviceBuffer enc_in;        // f32 [B*S, d]: an encoder output passed in by the caller
  DeviceBuffer enc_act;       // act [B*S, d]: the encoder output as a GEMM operand
  DeviceBuffer cross_kv;      // act [B*S, L*2*inner]: cross-attention k | v of every block
  DeviceBuffer dec_mask;      // i32 [B*S]: the encoder padding mask
  DeviceBuffer kv_cache;      // act [L, B, Tmax, 2*inner]: self-attention k | v per position
  DeviceBuffer vocab_logits;  // f32 [n, V]
  DeviceBuffer tokens;        // i32 [n]: decoder input ids (generate: the current token)
  DeviceBuffer finished;      // u8 [B]
  PinnedBuffer step_ids, step_obs;

  int n_slots = 3;
  std::shared_ptr<SlotPool> pool;
  std::vector<std::unique_ptr<SlotDev>> slots;
  std::deque<int> order;  // in-flight slots in submit order
  uint64_t next_ticket = 0;

  void upload_weights(const SwitchWeights& w);
  DevBlock upload_block(const Block& b, std::vector<float>& scratch, std::vector<uint8_t>& conv);
  void reserve(int64_t B, int64_t S);
  const float* bias_table(int64_t S);
  void feed_forward(const DevBlock& b, Acts& a, int64_t B, int64_t S, float* X, const RouterOut& r);
  void forward(int64_t B, int64_t S, Tap& tap);
  // Decoder.
  const float* enc_output(const Batch& batch, const Encoded& enc, const char* what);
  void prepare_decoder(const float* enc, const Batch& batch);
  const float* dec_bias_table(int64_t Tmax);
  void decoder_layers(int64_t B, int64_t S, int64_t Tq, int64_t t0, int64_t Tmax, Tap& tap);
  void lm_logits(int64_t n);
  GenerateResult generate(const float* enc, const Batch& batch, int64_t max_new_tokens,
                          int64_t min_new_tokens, Observer* obs);
  Tensor decode(const float* enc, const Batch& batch, const std::vector<int32_t>& dec_ids,
                int64_t T, Observer* obs);
  size_t device_bytes() const;
  void configure_slots();
};

DevBlock CudaSwitchModel::Impl::upload_block(const Block& b, std::vector<float>& scratch,
                                             std::vector<uint8_t>& conv) {
  const size_t as = cuda::act_size(act);
  auto upload_act = [&](const Matrix& m, DeviceBuffer& buf) {
    buf.reserve(static_cast<size_t>(m.rows * m.cols) * as);
    upload_matrix(m, act, buf.get(), scratch, conv);
  };
  DevBlock db;
  db.ln_attn = upload_f32(b.ln_attn);
  db.ln_ff = upload_f32(b.ln_ff);
  upload_act(b.self_attn.qkv, db.qkv);
  upload_act(b.self_attn.o, db.o);
  if (!b.ln_cross.empty()) {
    db.ln_cross = upload_f32(b.ln_cross);
    upload_act(b.cross_attn.q, db.cross_q);
    upload_act(b.cross_attn.o, db.cross_o);
  }
  db.sparse = b.sparse;
  if (b.sparse) {
    if (!b.moe.bias.empty()) fail("CudaSwitchModel: router_bias is not supported on the GPU yet");
    db.router.reserve(static_cast<size_t>(E * d) * 4);
    upload_matrix(b.moe.router, DType::kF32, db.router.get(), scratch, conv);
    const size_t per = static_cast<size_t>(F * d) * as;
    db.wi.reserve(per * static_cast<size_t>(E));
    db.wo.reserve(per * static_cast<size_t>(E));
    for (int64_t e = 0; e < E; ++e) {
      const Expert& ex = b.moe.experts[static_cast<size_t>(e)];
      upload_matrix(ex.wi, act, db.wi.as<uint8_t>() + static_cast<size_t>(e) * per, scratch, conv);
      upload_matrix(ex.wo, act, db.wo.as<uint8_t>() + static_cast<size_t>(e) * per, scratch, conv);
    }
  } else {
    upload_act(b.dense.wi, db.wi);
    upload_act(b.dense.wo, db.wo);
  }
  return db;
}

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
    blocks.push_back(upload_block(b, scratch, conv));
    if (b.sparse) blocks.back().sparse_index = sparse_index++;
    if (pairs) {
      // [Wo | Wo]: one GEMM over the context's hi | lo halves computes hi·Woᵀ + lo·Woᵀ.
      DeviceBuffer o2;
      const size_t row = static_cast<size_t>(inner) * as;
      o2.reserve(2 * row * static_cast<size_t>(d));
      for (size_t half = 0; half < 2; ++half)
        MT_CUDA_CHECK(cudaMemcpy2D(o2.as<uint8_t>() + half * row, 2 * row, blocks.back().o.get(),
                                   row, row, static_cast<size_t>(d), cudaMemcpyDeviceToDevice));
      blocks.back().o = std::move(o2);
    }
  }
  n_sparse = sparse_index;
  has_decoder = w.has_decoder;
  if (!has_decoder) return;

  dec_rel_bias = w.dec_rel_bias;
  const auto L = static_cast<int64_t>(w.decoder.size());
  const size_t kv_bytes = static_cast<size_t>(2 * inner * d) * as;
  cross_kv_w.reserve(kv_bytes * static_cast<size_t>(std::max<int64_t>(L, 1)));
  sparse_index = 0;
  for (int64_t i = 0; i < L; ++i) {
    const Block& b = w.decoder[static_cast<size_t>(i)];
    dec_blocks.push_back(upload_block(b, scratch, conv));
    if (b.sparse) dec_blocks.back().sparse_index = sparse_index++;
    upload_matrix(b.cross_attn.kv, act,
                  cross_kv_w.as<uint8_t>() + static_cast<size_t>(i) * kv_bytes, scratch, conv);
  }
  // Tied embeddings: logits = (x · d^-0.5) · sharedᵀ (SWITCH_SPEC.md). The scale is folded into
  // the final norm's weight: (w·s)·x̂ instead of (w·x̂)·s, a float32 rounding apart.
  std::vector<float> ln = w.dec_final_ln;
  if (c.tie_word_embeddings) {
    const auto scale = static_cast<float>(std::pow(static_cast<double>(d), -0.5));
    for (float& v : ln) v *= scale;
  }
  dec_final_ln = upload_f32(ln);
  if (c.tie_word_embeddings && embed_dt == act) {
    lm_head = embed.get();
  } else {
    lm_head_own.reserve(static_cast<size_t>(w.lm_head.rows * w.lm_head.cols) * as);
    upload_matrix(w.lm_head, act, lm_head_own.get(), scratch, conv);
    lm_head = lm_head_own.get();
  }
}

void CudaSwitchModel::Impl::reserve(int64_t B, int64_t S) {
  const int64_t T = B * S;
  if (S > 1024) fail("CudaSwitchModel: sequence length ", S, " > 1024 is not supported");
  const size_t as = cuda::act_size(act);
  if (T > cap_T) {
    const auto t = static_cast<size_t>(T);
    enc_valid = false;  // `out` is reallocated
    ids.reserve(t * 4);
    mask.reserve(t * 4);
    out.reserve(t * d * 4);
    enc.reserve(T, d, inner, F, E, act);
    if (pairs) ctx_pair.reserve(t * 2 * inner * as);
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

void CudaSwitchModel::Impl::feed_forward(const DevBlock& b, Acts& a, int64_t B, int64_t S, float* X,
                                         const RouterOut& r) {
  const int64_t T = B * S;
  cudaStream_t s = compute->get();
  cuda::rmsnorm(X, b.ln_ff.as<float>(), T, d, eps, a.h.get(), act,
                b.sparse ? a.hr.as<float>() : nullptr, s);
  if (!b.sparse) {
    blas->gemm_nt(
        GemmArgs{T, F, d, a.h.get(), d, b.wi.get(), d, a.ffn.get(), F, act, act, false, true});
    blas->gemm_nt(GemmArgs{T, d, F, a.ffn.get(), F, b.wo.get(), F, X, d, act, DType::kF32, true});
    return;
  }
  // Router: float32 logits from the float32 norm output, then softmax/top-1/capacity/gate.
  blas->gemm_nt(
      GemmArgs{T, E, d, a.hr.get(), d, b.router.get(), d, r.logits, E, DType::kF32, DType::kF32});
  MT_CUDA_CHECK(cudaMemsetAsync(a.counts.get(), 0, static_cast<size_t>(E) * 4, s));
  const DType probs_dt = opt.fp32.routing ? DType::kF32 : act;  // what the argmax and gate see
  cuda::moe_route(r.logits, B, S, E, capacity, probs_dt, r.expert, r.dropped, r.gate,
                  a.counts.as<int32_t>(), r.logits_f16, s);
  // Experts: permute by expert on the device, grouped GEMMs, gate + un-permute fused into x.
  const int tile_m = cuda::grouped_tile_m(act);
  const int64_t max_tiles = T / tile_m + 1 + E;
  cuda::moe_plan(a.counts.as<int32_t>(), E, tile_m, max_tiles, a.offsets.as<int32_t>(),
                 a.tile_expert.as<int32_t>(), a.tile_row.as<int32_t>(), a.cursor.as<int32_t>(), s);
  cuda::moe_permute(r.expert, r.dropped, T, a.offsets.as<int32_t>(), a.cursor.as<int32_t>(),
                    a.perm.as<int32_t>(), s);
  cuda::grouped_gemm(a.h.get(), d, true, a.perm.as<int32_t>(), b.wi.get(), F, d,
                     a.tile_expert.as<int32_t>(), a.tile_row.as<int32_t>(), a.offsets.as<int32_t>(),
                     max_tiles, cuda::GroupedEpilogue::kRelu, a.ffn.get(), F, nullptr, act, s);
  cuda::grouped_gemm(a.ffn.get(), F, false, a.perm.as<int32_t>(), b.wo.get(), d, F,
                     a.tile_expert.as<int32_t>(), a.tile_row.as<int32_t>(), a.offsets.as<int32_t>(),
                     max_tiles, cuda::GroupedEpilogue::kGateResidual, X, d, r.gate, act, s);
}

void CudaSwitchModel::Impl::forward(int64_t B, int64_t S, Tap& tap) {
  const int64_t T = B * S;
  const size_t as = cuda::act_size(act);
  cudaStream_t s = compute->get();
  const int32_t* d_ids = ids.as<int32_t>();
  const int32_t* d_mask = mask.as<int32_t>();
  float* X = enc.x.as<float>();
  const float* bias = bias_table(S);

  auto** tab = ptrs.as<void*>();
  const int64_t n = B * H;
  cuda::AttentionPointers p{
      const_cast<const void**>(tab),         const_cast<const void**>(tab + n),
      const_cast<const void**>(tab + 2 * n), tab + 3 * n,
      const_cast<const void**>(tab + 4 * n), tab + 5 * n};
  // Attention: fused on the tensor cores where it applies, else batched GEMMs around a softmax.
  const bool flash = cuda::flash_attention_supported(dk, S, act);
  if (!flash)
    cuda::attention_pointers(enc.qkv.get(), scores.as<float>(), probs.get(), enc.ctx.get(), B, S, H,
                             dk, act, p, s);
  cuda::embed(d_ids, embed.get(), embed_dt, T, d, X, s);

  for (size_t i = 0; i < blocks.size(); ++i) {
    const DevBlock& b = blocks[i];
    const auto bi = static_cast<int64_t>(i);
    tap.put(key(bi, keys::kInput), X, DType::kF32, {B, S, d});
    // Self-attention: x += o(softmax(q·kᵀ + bias + mask)·v).
    cuda::rmsnorm(X, b.ln_attn.as<float>(), T, d, eps, enc.h.get(), act, nullptr, s);
    blas->gemm_nt(GemmArgs{T, 3 * inner, d, enc.h.get(), d, b.qkv.get(), d, enc.qkv.get(),
                           3 * inner, act, act});
    if (flash) {
      cuda::flash_attention(enc.qkv.get(), bias, d_mask, B, S, H, dk,
                            pairs ? ctx_pair.get() : enc.ctx.get(), act, s, pairs);
    } else {
      blas->batched_nt(n, S, S, dk, p.q, 3 * inner, p.k, 3 * inner, p.scores, S, act, DType::kF32);
      cuda::attention_softmax(scores.as<float>(), bias, d_mask, false, B, H, S, S, probs.get(), act,
                              s);
      blas->batched_nn(n, S, dk, S, p.probs, S, p.v, 3 * inner, p.ctx, inner, act, act);
      if (pairs) {  // no pairs without the fused attention: hi = the context, lo = 0
        const size_t row = static_cast<size_t>(inner) * as;
        MT_CUDA_CHECK(cudaMemcpy2DAsync(ctx_pair.get(), 2 * row, enc.ctx.get(), row, row,
                                        static_cast<size_t>(T), cudaMemcpyDeviceToDevice, s));
        MT_CUDA_CHECK(cudaMemset2DAsync(ctx_pair.as<uint8_t>() + row, 2 * row, 0, row,
                                        static_cast<size_t>(T), s));
      }
    }
    // x += ctx·Woᵀ; with pairs over K = 2·inner: [hi | lo]·[Wo | Wo]ᵀ.
    const int64_t K = pairs ? 2 * inner : inner;
    blas->gemm_nt(GemmArgs{T, d, K, pairs ? ctx_pair.get() : enc.ctx.get(), K, b.o.get(), K, X, d,
                           act, DType::kF32, true});
    // Feed-forward; a sparse block's router writes into the capture slot when there is one.
    const RouterOut scratch{enc.logits.as<float>(), nullptr, enc.expert.as<int32_t>(),
                            enc.dropped.as<uint8_t>(), enc.gate.as<float>()};
    const RouterOut r = b.sparse ? tap.router_out(b.sparse_index, T, scratch) : scratch;
    feed_forward(b, enc, B, S, X, r);
    if (!b.sparse) continue;
    tap.router_input(b.sparse_index, T, d, enc.hr.as<float>());
    tap.put(key(bi, keys::kHidden), enc.hr.get(), DType::kF32, {B, S, d});
    tap.put(key(bi, keys::kRouterLogits), r.logits, DType::kF32, {B, S, E});
    tap.put(key(bi, keys::kExpert), r.expert, DType::kI32, {B, S});
    tap.put(key(bi, keys::kDropped), r.dropped, DType::kU8, {B, S});
    tap.put(key(bi, keys::kGate), r.gate, DType::kF32, {B, S});
  }
  cuda::rmsnorm(X, final_ln.as<float>(), T, d, eps, out.get(), DType::kF32, nullptr, s);
  tap.put(std::string(keys::kEncoderOutput), out.get(), DType::kF32, {B, S, d});
}

size_t CudaSwitchModel::Impl::device_bytes() const {
  size_t n = embed.bytes() + final_ln.bytes();
  for (const auto* stack : {&blocks, &dec_blocks})
    for (const auto& b : *stack)
      n += b.ln_attn.bytes() + b.ln_ff.bytes() + b.qkv.bytes() + b.o.bytes() + b.wi.bytes() +
           b.wo.bytes() + b.router.bytes() + b.ln_cross.bytes() + b.cross_q.bytes() +
           b.cross_o.bytes();
  for (const auto* tables : {&bias_tables, &dec_bias_tables})
    for (const auto& [len, t] : *tables) n += t.bytes();
  n += enc.bytes() + dec.bytes();
  for (const DeviceBuffer* b : {&ids, &mask, &scores, &probs, &ptrs, &out, &ctx_pair, &cross_kv_w,
                                &dec_final_ln, &lm_head_own, &enc_in, &enc_act, &cross_kv,
                                &dec_mask, &kv_cache, &vocab_logits, &tokens, &finished})
    n += b->bytes();
  for (const auto& sl : slots) n += sl->staging.bytes();
  return n;
}

// ---- decoder
// -------------------------------------------------------------------------------------

// The encoder output for a decoder call: still on the device when `enc` is the latest encode() of
// this very batch, else enc.output uploaded.
const float* CudaSwitchModel::Impl::enc_output(const Batch& batch, const Encoded& enc,
                                               const char* what) {
  const std::string who = std::string("CudaSwitchModel::") + what;
  if (!has_decoder) fail(who, ": the model was loaded encoder-only; the decoder is not available");
  check_batch(batch, c.vocab_size, who);
  const int64_t B = batch.B, S = batch.S, n = B * S;
  if (S > cuda::kDecodeMaxKeys) fail(who, ": encoder length ", S, " > ", cuda::kDecodeMaxKeys);
  check_encoded(enc, batch, d, who);
  const Tensor& o = enc.output;
  if (enc.id != 0 && enc_valid && enc.id == enc_id && enc_ids == batch.input_ids &&
      enc_mask == batch.attention_mask)
    return out.as<float>();
  enc_in.reserve(static_cast<size_t>(n * d) * 4);
  MT_CUDA_CHECK(
      cudaMemcpyAsync(enc_in.get(), o.raw(), o.nbytes(), cudaMemcpyHostToDevice, compute->get()));
  return enc_in.as<float>();
}

// Per batch: the padding mask and every block's cross-attention keys/values (one GEMM).
void CudaSwitchModel::Impl::prepare_decoder(const float* enc_f32, const Batch& batch) {
  const int64_t n = batch.B * batch.S, L = static_cast<int64_t>(dec_blocks.size());
  const size_t as = cuda::act_size(act);
  cudaStream_t s = compute->get();
  dec_mask.reserve(static_cast<size_t>(n) * 4);
  MT_CUDA_CHECK(cudaMemcpyAsync(dec_mask.get(), batch.attention_mask.data(),
                                static_cast<size_t>(n) * 4, cudaMemcpyHostToDevice, s));
  const void* a = enc_f32;
  if (act != DType::kF32) {
    enc_act.reserve(static_cast<size_t>(n * d) * as);
    cuda::convert_f32(enc_f32, n * d, enc_act.get(), act, s);
    a = enc_act.get();
  }
  cross_kv.reserve(static_cast<size_t>(n * L * 2 * inner) * as);
  blas->gemm_nt(GemmArgs{n, L * 2 * inner, d, a, d, cross_kv_w.get(), d, cross_kv.get(),
                         L * 2 * inner, act, act});
}

// [H, Tmax]: the decoder's relative position bias of a key `a` positions behind its query
// (unidirectional buckets, SWITCH_SPEC.md).
const float* CudaSwitchModel::Impl::dec_bias_table(int64_t Tmax) {
  auto it = dec_bias_tables.find(Tmax);
  if (it != dec_bias_tables.end()) return it->second.as<float>();
  std::vector<float> table(static_cast<size_t>(H * Tmax));
  for (int64_t a = 0; a < Tmax; ++a) {
    const int bucket = relative_position_bucket(-a, false, c.relative_attention_num_buckets,
                                                c.relative_attention_max_distance);
    for (int64_t hh = 0; hh < H; ++hh) table[hh * Tmax + a] = dec_rel_bias[bucket * H + hh];
  }
  return dec_bias_tables.emplace(Tmax, upload_f32(table)).first->second.as<float>();
}

// The decoder blocks over Tq new positions t0..t0+Tq-1 of B sequences: dec.x [B*Tq, d] holds their
// embeddings on entry and the last block's output on exit. Each block writes the new positions'
// self-attention k | v into its cache [B, Tmax, 2*inner] and attends causally over positions
// 0..t0+Tq-1; cross-attention reads cross_kv with the encoder padding mask. Either a generation
// step (Tq == 1, any t0 < Tmax) or a teacher-forced pass (t0 == 0, Tq == Tmax).
void CudaSwitchModel::Impl::decoder_layers(int64_t B, int64_t S, int64_t Tq, int64_t t0,
                                           int64_t Tmax, Tap& tap) {
  MT_ASSERT((Tq == 1 && t0 < Tmax) || (t0 == 0 && Tq == Tmax));
  const int64_t n = B * Tq, L = static_cast<int64_t>(dec_blocks.size());
  const int64_t kv_ld = 2 * inner, cross_ld = L * 2 * inner;
  const size_t as = cuda::act_size(act);
  cudaStream_t s = compute->get();
  float* Y = dec.x.as<float>();
  const float* bias = dec_bias_table(Tmax);
  for (int64_t i = 0; i < L; ++i) {
    const DevBlock& b = dec_blocks[static_cast<size_t>(i)];
    tap.put(dec_key(i, keys::kInput), Y, DType::kF32, {B, Tq, d});
    // Self-attention: q of the new positions; their k, v go straight into the cache.
    cuda::rmsnorm(Y, b.ln_attn.as<float>(), n, d, eps, dec.h.get(), act, nullptr, s);
    blas->gemm_nt(
        GemmArgs{n, inner, d, dec.h.get(), d, b.qkv.get(), d, dec.qkv.get(), inner, act, act});
    uint8_t* cache = kv_cache.as<uint8_t>() + static_cast<size_t>(i * B * Tmax * kv_ld) * as;
    const uint8_t* w_kv = b.qkv.as<uint8_t>() + static_cast<size_t>(inner * d) * as;
    if (Tq == 1)  // row b at cache[b, t0, :]
      blas->gemm_nt(GemmArgs{B, kv_ld, d, dec.h.get(), d, w_kv, d,
                             cache + static_cast<size_t>(t0 * kv_ld) * as, Tmax * kv_ld, act, act});
    else  // rows (b, j) are contiguous: the cache is [B*Tq, 2*inner]
      blas->gemm_nt(GemmArgs{n, kv_ld, d, dec.h.get(), d, w_kv, d, cache, kv_ld, act, act});
    cuda::decode_attention(dec.qkv.get(), inner, cache, cache + static_cast<size_t>(inner) * as,
                           kv_ld, Tmax * kv_ld, bias, Tmax, nullptr, true, B, H, Tq, t0 + Tq, dk,
                           dec.ctx.get(), inner, act, s);
    blas->gemm_nt(GemmArgs{n, d, inner, dec.ctx.get(), inner, b.o.get(), inner, Y, d, act,
                           DType::kF32, true});
    // Cross-attention over the encoder output (no position bias, the padding mask).
    cuda::rmsnorm(Y, b.ln_cross.as<float>(), n, d, eps, dec.h.get(), act, nullptr, s);
    blas->gemm_nt(
        GemmArgs{n, inner, d, dec.h.get(), d, b.cross_q.get(), d, dec.qkv.get(), inner, act, act});
    const uint8_t* ckv = cross_kv.as<uint8_t>() + static_cast<size_t>(i * kv_ld) * as;
    cuda::decode_attention(dec.qkv.get(), inner, ckv, ckv + static_cast<size_t>(inner) * as,
                           cross_ld, S * cross_ld, nullptr, 0, dec_mask.as<int32_t>(), false, B, H,
                           Tq, S, dk, dec.ctx.get(), inner, act, s);
    blas->gemm_nt(GemmArgs{n, d, inner, dec.ctx.get(), inner, b.cross_o.get(), inner, Y, d, act,
                           DType::kF32, true});
    // Feed-forward: the router sees Tq tokens per sequence, so a generation step (one token)
    // never drops one, as in the CPU engine; a teacher-forced pass can.
    const RouterOut r{dec.logits.as<float>(), nullptr, dec.expert.as<int32_t>(),
                      dec.dropped.as<uint8_t>(), dec.gate.as<float>()};
    feed_forward(b, dec, B, Tq, Y, r);
    if (!b.sparse) continue;
    tap.put(dec_key(i, keys::kHidden), dec.hr.get(), DType::kF32, {B, Tq, d});
    tap.put(dec_key(i, keys::kRouterLogits), r.logits, DType::kF32, {B, Tq, E});
    tap.put(dec_key(i, keys::kExpert), r.expert, DType::kI32, {B, Tq});
    tap.put(dec_key(i, keys::kDropped), r.dropped, DType::kU8, {B, Tq});
    tap.put(dec_key(i, keys::kGate), r.gate, DType::kF32, {B, Tq});
  }
}

// Final norm (with the tied-embedding scale folded in) and the LM head: vocab_logits [n, V] f32.
void CudaSwitchModel::Impl::lm_logits(int64_t n) {
  const int64_t V = c.vocab_size;
  cuda::rmsnorm(dec.x.as<float>(), dec_final_ln.as<float>(), n, d, eps, dec.h.get(), act, nullptr,
                compute->get());
  blas->gemm_nt(
      GemmArgs{n, V, d, dec.h.get(), d, lm_head, d, vocab_logits.get(), V, act, DType::kF32});
}

GenerateResult CudaSwitchModel::Impl::generate(const float* enc_f32, const Batch& batch,
                                               int64_t max_new_tokens, int64_t min_new_tokens,
                                               Observer* obs) {
  const int64_t B = batch.B, S = batch.S, V = c.vocab_size;
  const int64_t L = static_cast<int64_t>(dec_blocks.size()),
                Tmax = std::max<int64_t>(max_new_tokens, 1);
  if (Tmax > cuda::kDecodeMaxKeys)
    fail("CudaSwitchModel::generate: max_new_tokens ", max_new_tokens, " > ", cuda::kDecodeMaxKeys);
  const size_t as = cuda::act_size(act);
  cudaStream_t s = compute->get();
  prepare_decoder(enc_f32, batch);
  dec.reserve(B, d, inner, F, E, act);
  kv_cache.reserve(static_cast<size_t>(L * B * Tmax * 2 * inner) * as);
  vocab_logits.reserve(static_cast<size_t>(B * V) * 4);
  tokens.reserve(static_cast<size_t>(B) * 4);
  finished.reserve(static_cast<size_t>(B));
  step_ids.reserve(static_cast<size_t>(B) * 4);
  // Room for every key of one step: per block input and router input [B, d] f32, logits [B, E]
  // f32, expert, dropped and gate, each 256-aligned.
  step_obs.reserve(static_cast<size_t>(L) *
                   (align256(static_cast<size_t>(B * d) * 4) * 2 +
                    align256(static_cast<size_t>(B * E) * 4) +
                    align256(static_cast<size_t>(B) * 4) * 2 + align256(static_cast<size_t>(B))));
  const std::vector<int32_t> start(static_cast<size_t>(B),
                                   static_cast<int32_t>(c.decoder_start_token_id));
  MT_CUDA_CHECK(cudaMemcpyAsync(tokens.get(), start.data(), static_cast<size_t>(B) * 4,
                                cudaMemcpyHostToDevice, s));
  MT_CUDA_CHECK(cudaMemsetAsync(finished.get(), 0, static_cast<size_t>(B), s));

  const auto eos = static_cast<int32_t>(c.eos_token_id);
  const auto pad = static_cast<int32_t>(c.pad_token_id);
  std::vector<std::vector<int32_t>> seqs(
      static_cast<size_t>(B), std::vector<int32_t>{static_cast<int32_t>(c.decoder_start_token_id)});
  std::vector<bool> done(static_cast<size_t>(B), false);
  Tap tap = Tap::staged(obs, s, &step_obs);
  int64_t steps = 0;
  // One synchronization per step: the step's ids (and staged observations) reach the host, which
  // decides on the early stop exactly as SwitchModel::generate (no step runs after every sequence
  // finished, so no observation is offered that the CPU engine would not offer).
  for (int64_t t = 0; t < max_new_tokens; ++t) {
    cuda::embed(tokens.as<int32_t>(), embed.get(), embed_dt, B, d, dec.x.as<float>(), s);
    decoder_layers(B, S, 1, t, Tmax, tap);
    lm_logits(B);
    cuda::greedy_pick(vocab_logits.as<float>(), B, V, t < min_new_tokens ? eos : -1, eos, pad,
                      finished.as<uint8_t>(), tokens.as<int32_t>(), s);
    MT_CUDA_CHECK(cudaMemcpyAsync(step_ids.get(), tokens.get(), static_cast<size_t>(B) * 4,
                                  cudaMemcpyDeviceToHost, s));
    tap.flush();
    bool all_done = true;
    for (int64_t b = 0; b < B; ++b) {
      const int32_t next = step_ids.as<int32_t>()[b];
      seqs[static_cast<size_t>(b)].push_back(next);
      if (next == eos) done[static_cast<size_t>(b)] = true;
      all_done = all_done && done[static_cast<size_t>(b)];
    }
    steps = t + 1;
    if (all_done) break;
  }
  GenerateResult r;
  r.B = B;
  r.steps = steps;
  r.ids.reserve(static_cast<size_t>(B * (steps + 1)));
  for (const auto& q : seqs) r.ids.insert(r.ids.end(), q.begin(), q.end());
  return r;
}

Tensor CudaSwitchModel::Impl::decode(const float* enc_f32, const Batch& batch,
                                     const std::vector<int32_t>& dec_ids, int64_t T,
                                     Observer* obs) {
  const int64_t B = batch.B, S = batch.S, n = B * T, V = c.vocab_size;
  const int64_t L = static_cast<int64_t>(dec_blocks.size());
  check_decoder_ids(dec_ids, B, T, V, "CudaSwitchModel::decode");
  if (T > 1024) fail("CudaSwitchModel::decode: decoder length ", T, " > 1024");
  const size_t as = cuda::act_size(act);
  cudaStream_t s = compute->get();
  prepare_decoder(enc_f32, batch);
  dec.reserve(n, d, inner, F, E, act);
  kv_cache.reserve(static_cast<size_t>(L * n * 2 * inner) * as);
  vocab_logits.reserve(static_cast<size_t>(n * V) * 4);
  tokens.reserve(static_cast<size_t>(n) * 4);
  MT_CUDA_CHECK(cudaMemcpyAsync(tokens.get(), dec_ids.data(), static_cast<size_t>(n) * 4,
                                cudaMemcpyHostToDevice, s));
  cuda::embed(tokens.as<int32_t>(), embed.get(), embed_dt, n, d, dec.x.as<float>(), s);
  Tap tap = Tap::now(obs, s);
  decoder_layers(B, S, T, 0, T, tap);
  lm_logits(n);
  Tensor logits(DType::kF32, {B, T, V});
  cuda::download(logits.raw(), vocab_logits.get(), logits.nbytes(), s);
  return logits;
}

void CudaSwitchModel::Impl::configure_slots() {
  auto p = std::make_shared<SlotPool>();
  p->state.assign(static_cast<size_t>(n_slots), SlotPool::kFree);
  p->host.resize(static_cast<size_t>(n_slots));
  pool = std::move(p);
  slots.clear();
  for (int i = 0; i < n_slots; ++i) slots.push_back(std::make_unique<SlotDev>());
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
  m.pairs = options.fp32.attention_pairs && m.act != DType::kF32;
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
  // Map (and check) the tensors; expert weights stay mapped (uploaded as they are or converted).
  WeightOptions wo;
  wo.encoder_only = load.encoder_only;
  wo.f32_expert_budget_bytes = 0;
  const SwitchWeights w = map_weights(m.c, *source, wo);
  m.upload_weights(w);
  m.configure_slots();
  MT_CUDA_CHECK(cudaDeviceSynchronize());
  m.load_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return std::unique_ptr<CudaSwitchModel>(new CudaSwitchModel(std::move(impl)));
}

CudaOptions cuda_options_for_precision(std::string_view precision) {
  const PrecisionMode m = precision_mode(precision);
  CudaOptions o;
  o.precision = m.operands;
  o.fp32.routing = m.fp32_routing;
  o.fp32.attention_pairs = m.attention_pairs;
  return o;
}

const SwitchConfig& CudaSwitchModel::config() const { return impl_->c; }
DType CudaSwitchModel::precision() const { return impl_->act; }
size_t CudaSwitchModel::device_bytes() const { return impl_->device_bytes(); }
double CudaSwitchModel::load_seconds() const { return impl_->load_s; }
void CudaSwitchModel::reserve(int64_t B, int64_t S) { impl_->reserve(B, S); }

Encoded CudaSwitchModel::encode(const Batch& batch, Observer* obs) {
  Impl& m = *impl_;
  check_batch(batch, m.c.vocab_size, "CudaSwitchModel::encode");
  const int64_t B = batch.B, S = batch.S, T = B * S;
  m.enc_valid = false;  // until this batch's output is complete
  m.reserve(B, S);
  MT_CUDA_CHECK(cudaMemcpyAsync(m.ids.get(), batch.input_ids.data(), T * 4, cudaMemcpyHostToDevice,
                                m.compute->get()));
  MT_CUDA_CHECK(cudaMemcpyAsync(m.mask.get(), batch.attention_mask.data(), T * 4,
                                cudaMemcpyHostToDevice, m.compute->get()));
  Tap tap = Tap::now(obs, m.compute->get());
  m.forward(B, S, tap);
  Encoded e;
  e.output = Tensor(DType::kF32, {B, S, m.d});
  cuda::download(e.output.raw(), m.out.get(), e.output.nbytes(), m.compute->get());
  e.id = ++m.encodes;
  m.enc_valid = true;
  m.enc_id = e.id;
  m.enc_ids = batch.input_ids;
  m.enc_mask = batch.attention_mask;
  return e;
}

bool CudaSwitchModel::has_decoder() const { return impl_->has_decoder; }

GenerateResult CudaSwitchModel::generate(const Encoded& enc, const Batch& batch,
                                         int64_t max_new_tokens, int64_t min_new_tokens,
                                         Observer* obs) {
  Impl& m = *impl_;
  return m.generate(m.enc_output(batch, enc, "generate"), batch, max_new_tokens, min_new_tokens,
                    obs);
}

Tensor CudaSwitchModel::decode(const Encoded& enc, const Batch& batch,
                               const std::vector<int32_t>& dec_ids, int64_t T, Observer* obs) {
  Impl& m = *impl_;
  return m.decode(m.enc_output(batch, enc, "decode"), batch, dec_ids, T, obs);
}

void CudaSwitchModel::set_slots(int n) {
  Impl& m = *impl_;
  if (!m.order.empty()) fail("CudaSwitchModel::set_slots: batches are in flight");
  {
    std::lock_guard<std::mutex> lock(m.pool->mu);
    for (auto st : m.pool->state)
      if (st != SlotPool::kFree)
        fail("CudaSwitchModel::set_slots: captured batches are still held");
  }
  if (n < 1) fail("CudaSwitchModel::set_slots: slots must be >= 1");
  m.n_slots = n;
  m.configure_slots();
}

int CudaSwitchModel::in_flight() const { return static_cast<int>(impl_->order.size()); }
int CudaSwitchModel::slots() const { return impl_->n_slots; }

namespace {

// What a submit()'s request asks the pipeline to copy, for every sparse encoder block: a field is
// captured when the request wants it of any block; dtypes are the request's preference.
CaptureSpec spec_of(const Observer& request, const std::vector<int>& blocks) {
  CaptureSpec spec;
  std::optional<DType> logits, hidden;
  for (int bi : blocks) {
    auto wants = [&](std::string_view field) { return request.wants(key(bi, field)); };
    if (wants(keys::kRouterLogits)) {
      spec.router_logits = true;
      logits = request.preferred_dtype(key(bi, keys::kRouterLogits));
    }
    if (wants(keys::kHidden)) {
      spec.hidden = true;
      hidden = request.preferred_dtype(key(bi, keys::kHidden));
    }
    spec.expert |= wants(keys::kExpert);
    spec.dropped |= wants(keys::kDropped);
    spec.gate |= wants(keys::kGate);
  }
  spec.logits_dtype = logits.value_or(DType::kF32);
  spec.hidden_dtype = hidden.value_or(DType::kF32);
  if (spec.hidden && spec.hidden_dtype != DType::kF32 && spec.hidden_dtype != DType::kBF16 &&
      spec.hidden_dtype != DType::kF16)
    fail("CudaSwitchModel::submit: hidden dtype must be F32, BF16 or F16, not ",
         dtype_name(spec.hidden_dtype));
  if (spec.router_logits && spec.logits_dtype != DType::kF16 && spec.logits_dtype != DType::kF32)
    fail("CudaSwitchModel::submit: logits dtype must be F16 or F32, not ",
         dtype_name(spec.logits_dtype));
  return spec;
}

}  // namespace

uint64_t CudaSwitchModel::submit(const Batch& batch, const Observer& request) {
  Impl& m = *impl_;
  check_batch(batch, m.c.vocab_size, "CudaSwitchModel::submit");
  const int64_t B = batch.B, S = batch.S, T = B * S;
  const CaptureSpec spec = spec_of(request, m.c.sparse_encoder_blocks());
  int k = -1;
  {
    std::unique_lock<std::mutex> lock(m.pool->mu);
    for (;;) {
      bool held = false;
      for (size_t i = 0; i < m.pool->state.size(); ++i) {
        if (m.pool->state[i] == SlotPool::kFree) {
          k = static_cast<int>(i);
          break;
        }
        held |= m.pool->state[i] == SlotPool::kHeld;
      }
      if (k >= 0) break;
      if (!held)
        fail("CudaSwitchModel::submit: all ", m.n_slots, " slots are in flight; poll() first");
      m.pool->cv.wait(lock);
    }
    m.pool->state[static_cast<size_t>(k)] = SlotPool::kInFlight;
  }
  SlotDev& sl = *m.slots[static_cast<size_t>(k)];
  cudaStream_t s = m.compute->get();
  m.reserve(B, S);
  const CaptureLayout layout(spec, T, m.n_sparse, m.E, m.d);
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
  m.enc_valid = false;  // the forward below overwrites the encoder output
  Tap tap = Tap::slot(sl.staging.as<uint8_t>(), layout, spec, m.E, s);
  m.forward(B, S, tap);
  sl.computed.record(s);
  MT_CUDA_CHECK(cudaStreamWaitEvent(m.copy->get(), sl.computed.get(), 0));
  MT_CUDA_CHECK(cudaMemcpyAsync(m.pool->host[static_cast<size_t>(k)].get(), sl.staging.get(),
                                layout.total, cudaMemcpyDeviceToHost, m.copy->get()));
  sl.copied.record(m.copy->get());
  sl.ticket = m.next_ticket++;
  sl.B = B;
  sl.S = S;
  sl.bytes = layout.total;
  sl.spec = spec;
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
    m.pool->state[static_cast<size_t>(k)] = SlotPool::kHeld;
  }
  auto r = std::make_unique<SlotBatch>(m.pool, k);
  const CaptureSpec& spec = sl.spec;
  r->ticket = sl.ticket;
  r->B = sl.B;
  r->S = sl.S;
  const int64_t T = sl.B * sl.S;
  const CaptureLayout layout(spec, T, m.n_sparse, m.E, m.d);
  const auto* base = static_cast<const uint8_t*>(m.pool->host[static_cast<size_t>(k)].get());
  for (const DevBlock& b : m.blocks) {
    if (!b.sparse) continue;
    const int64_t bi = &b - m.blocks.data();
    const auto lt = static_cast<size_t>(b.sparse_index * T);
    if (spec.router_logits)
      r->tensors.emplace_back(
          key(bi, keys::kRouterLogits),
          TensorView{spec.logits_dtype,
                     {sl.B, sl.S, m.E},
                     base + layout.logits + lt * static_cast<size_t>(m.E) * layout.logit_bytes});
    if (spec.expert)
      r->tensors.emplace_back(key(bi, keys::kExpert),
                              TensorView{DType::kI32, {sl.B, sl.S}, base + layout.expert + lt * 4});
    if (spec.dropped)
      r->tensors.emplace_back(key(bi, keys::kDropped),
                              TensorView{DType::kU8, {sl.B, sl.S}, base + layout.dropped + lt});
    if (spec.hidden)
      r->tensors.emplace_back(
          key(bi, keys::kHidden),
          TensorView{spec.hidden_dtype,
                     {sl.B, sl.S, m.d},
                     base + layout.hidden + lt * static_cast<size_t>(m.d) * layout.hidden_bytes});
    if (spec.gate)
      r->tensors.emplace_back(key(bi, keys::kGate),
                              TensorView{DType::kF32, {sl.B, sl.S}, base + layout.gate + lt * 4});
  }
  return r;
}

}  // namespace moetrace
