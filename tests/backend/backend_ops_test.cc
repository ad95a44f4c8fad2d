// The backend test, in the spirit of llama.cpp's test-backend-ops: every op case is written once,
// in the table at the end. For each case the CPU op (kernels/cpu, the reference) always runs and
// is checked against a plain loop or the op's invariants; whenever a GPU is visible the CUDA op
// (kernels/cuda) runs on the same inputs rounded to each activation dtype (f32, bf16, f16) and is
// compared with the CPU op at a per-dtype tolerance. Without a GPU the CUDA half says so (skipped
// with the reason); the CPU half never skips.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <memory>
#include <numeric>
#include <ostream>
#include <random>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "kernels/cpu/ops.h"
#ifdef MOETRACE_BACKEND_CUDA
#include "cuda/cuda_test_util.h"
#include "kernels/cuda/blas.h"
#include "kernels/cuda/ops.h"
#endif

namespace moetrace {
namespace {

constexpr DType kActs[] = {DType::kF32, DType::kBF16, DType::kF16};
constexpr float kLowest = std::numeric_limits<float>::lowest();

std::vector<float> random_vec(int64_t n, uint64_t seed, float lo = -1.f, float hi = 1.f) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> u(lo, hi);
  std::vector<float> v(static_cast<size_t>(n));
  for (auto& x : v) x = u(rng);
  return v;
}

std::vector<float> rounded(std::vector<float> v, DType act) {
  cpu::round_inplace(v.data(), static_cast<int64_t>(v.size()), act);
  return v;
}

// ‖a - b‖ / ‖b‖; NaN or a size mismatch never passes.
double rel_err(const std::vector<float>& a, const std::vector<float>& b) {
  if (a.size() != b.size()) return INFINITY;
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    if (std::isnan(a[i]) || std::isnan(b[i])) return INFINITY;
    num += (static_cast<double>(a[i]) - b[i]) * (static_cast<double>(a[i]) - b[i]);
    den += static_cast<double>(b[i]) * b[i];
  }
  return std::sqrt(num / std::max(den, 1e-300));
}

double act_tol(DType act) { return act == DType::kF32 ? 2e-6 : act == DType::kBF16 ? 8e-3 : 1e-3; }

// Padding mask [B, S]: sequence b keeps its first S - 7b positions (at least one).
std::vector<int32_t> padding_mask(int64_t B, int64_t S) {
  std::vector<int32_t> mask(static_cast<size_t>(B * S), 1);
  for (int64_t b = 1; b < B; ++b) {
    for (int64_t j = std::max<int64_t>(1, S - 7 * b); j < S; ++j) mask[b * S + j] = 0;
  }
  return mask;
}

// What an op produced: float outputs, compared within a tolerance, and exact ones (ids, flags,
// counts).
struct Outputs {
  std::vector<std::vector<float>> values;
  std::vector<std::vector<int32_t>> exact;
};

class OpCase {
 public:
  explicit OpCase(std::string name) : name_(std::move(name)) {}
  virtual ~OpCase() = default;
  const std::string& name() const { return name_; }
  // The CPU op on this case's inputs, rounded to act.
  virtual Outputs cpu(DType act) const = 0;
  // Checks the float32 CPU result against a plain loop or the op's invariants.
  virtual void check(const Outputs& got) const = 0;
  // The relative error ‖gpu - cpu‖ / ‖cpu‖ allowed for float output i.
  virtual double tolerance(DType act, size_t i) const { return act_tol(act); }
  // The relative error ‖cpu(act) - cpu(f32)‖ / ‖cpu(f32)‖ allowed: 16 units of act's rounding
  // (inputs rounded to 8 or 11 significant bits move the outputs by about that much).
  virtual double act_drift(DType act) const {
    return act == DType::kBF16 ? 16 * 0x1p-9 : 16 * 0x1p-12;
  }
  // The activation dtypes the CUDA op takes for this case.
  virtual bool gpu_runs(DType act) const { return true; }
#ifdef MOETRACE_BACKEND_CUDA
  virtual Outputs cuda(DType act, cudaStream_t s) const = 0;
#endif

 private:
  std::string name_;
};

// Flags and ids as int32, for Outputs::exact.
template <class T>
std::vector<int32_t> as_i32(const std::vector<T>& v) {
  return std::vector<int32_t>(v.begin(), v.end());
}

#ifdef MOETRACE_BACKEND_CUDA
using cuda::DeviceBuffer;
using cuda::test::from_device;
using cuda::test::from_device_raw;
using cuda::test::to_device;
using cuda::test::to_device_raw;
#endif

// ---- embed --------------------------------------------------------------------------------------

class EmbedCase : public OpCase {
 public:
  EmbedCase(int64_t V, int64_t d, int64_t T)
      : OpCase("embed_V" + std::to_string(V) + "_d" + std::to_string(d)), V_(V), d_(d), T_(T) {
    for (int64_t t = 0; t < T; ++t) ids_.push_back(static_cast<int32_t>((t * 17 + 3) % V));
  }
  Outputs cpu(DType act) const override {
    const auto table = rounded(random_vec(V_ * d_, 1), act);
    std::vector<uint8_t> bytes(table.size() * dtype_size(act));
    convert_from_f32(table.data(), act, bytes.data(), table.size());
    std::vector<float> x(static_cast<size_t>(T_ * d_));
    cpu::embed(ids_.data(), bytes.data(), act, T_, d_, x.data());
    return {{x}, {}};
  }
  void check(const Outputs& got) const override {
    const auto table = random_vec(V_ * d_, 1);
    for (int64_t t = 0; t < T_; ++t) {
      for (int64_t c = 0; c < d_; ++c)
        ASSERT_EQ(got.values[0][t * d_ + c], table[ids_[t] * d_ + c]);
    }
  }
  double tolerance(DType, size_t) const override { return 0; }  // a copy
#ifdef MOETRACE_BACKEND_CUDA
  Outputs cuda(DType act, cudaStream_t s) const override {
    auto table = to_device(rounded(random_vec(V_ * d_, 1), act), act);
    auto ids = to_device_raw(ids_);
    DeviceBuffer x(static_cast<size_t>(T_ * d_ * 4));
    cuda::embed(ids.as<int32_t>(), table.get(), act, T_, d_, x.as<float>(), s);
    return {{from_device(x, T_ * d_, DType::kF32)}, {}};
  }
#endif

 private:
  int64_t V_, d_, T_;
  std::vector<int32_t> ids_;
};

// ---- rmsnorm ------------------------------------------------------------------------------------

class RmsNormCase : public OpCase {
 public:
  RmsNormCase(int64_t rows, int64_t d)
      : OpCase("rmsnorm_d" + std::to_string(d)),
        rows_(rows),
        d_(d),
        x_(random_vec(rows * d, 2 + d, -3, 3)),
        w_(random_vec(d, 3, 0.5f, 1.5f)) {}
  // values: the output in act, the float32 output.
  Outputs cpu(DType act) const override {
    std::vector<float> out(x_.size()), out32(x_.size());
    cpu::rmsnorm(x_.data(), w_.data(), rows_, d_, kEps, out.data(), act, out32.data());
    return {{out, out32}, {}};
  }
  void check(const Outputs& got) const override {
    std::vector<float> want(x_.size());
    for (int64_t r = 0; r < rows_; ++r) {
      double ss = 0;
      for (int64_t c = 0; c < d_; ++c) ss += static_cast<double>(x_[r * d_ + c]) * x_[r * d_ + c];
      const double scale = 1 / std::sqrt(ss / static_cast<double>(d_) + kEps);
      for (int64_t c = 0; c < d_; ++c)
        want[r * d_ + c] = static_cast<float>(w_[c] * x_[r * d_ + c] * scale);
    }
    EXPECT_LT(rel_err(got.values[1], want), 1e-6);
    EXPECT_EQ(got.values[0], got.values[1]) << "f32: out and out_f32 are the same values";
  }
  double tolerance(DType act, size_t i) const override { return i == 1 ? 1e-6 : act_tol(act); }
#ifdef MOETRACE_BACKEND_CUDA
  Outputs cuda(DType act, cudaStream_t s) const override {
    auto x = to_device(x_, DType::kF32), w = to_device(w_, DType::kF32);
    const int64_t n = rows_ * d_;
    DeviceBuffer out(static_cast<size_t>(n * 4)), out32(static_cast<size_t>(n * 4));
    cuda::rmsnorm(x.as<float>(), w.as<float>(), rows_, d_, kEps, out.get(), act, out32.as<float>(),
                  s);
    return {{from_device(out, n, act), from_device(out32, n, DType::kF32)}, {}};
  }
#endif

 private:
  static constexpr float kEps = 1e-6f;
  int64_t rows_, d_;
  std::vector<float> x_, w_;
};

// ---- attention ----------------------------------------------------------------------------------

// Softmax in double of one row of scores (bias added, hidden keys already kLowest).
std::vector<double> plain_softmax(const std::vector<double>& s) {
  const double mx = *std::max_element(s.begin(), s.end());
  std::vector<double> p(s.size());
  double sum = 0;
  for (size_t j = 0; j < s.size(); ++j) sum += (p[j] = std::exp(s[j] - mx));
  for (auto& x : p) x /= sum;
  return p;
}

class AttentionSoftmaxCase : public OpCase {
 public:
  AttentionSoftmaxCase(int64_t B, int64_t H, int64_t S, bool causal)
      : OpCase(std::string("attention_softmax") + (causal ? "_causal" : "")),
        B_(B),
        H_(H),
        S_(S),
        causal_(causal),
        scores_(random_vec(B * H * S * S, 4, -8, 8)),
        bias_(random_vec(H * (2 * S - 1), 5, -2, 2)),
        mask_(padding_mask(B, S)) {}
  Outputs cpu(DType act) const override {
    std::vector<float> probs(scores_.size());
    cpu::attention_softmax(scores_.data(), bias_.data(), mask_.data(), causal_, B_, H_, S_, S_,
                           probs.data(), act);
    return {{probs}, {}};
  }
  void check(const Outputs& got) const override {
    for (int64_t b = 0; b < B_; ++b)
      for (int64_t h = 0; h < H_; ++h)
        for (int64_t i = 0; i < S_; ++i) {
          const int64_t row = ((b * H_ + h) * S_ + i) * S_;
          std::vector<double> s(static_cast<size_t>(S_));
          for (int64_t j = 0; j < S_; ++j) {
            const bool hidden = mask_[b * S_ + j] == 0 || (causal_ && j > i);
            s[j] = hidden ? kLowest
                          : scores_[row + j] + double{bias_[h * (2 * S_ - 1) + j - i + S_ - 1]};
          }
          const auto p = plain_softmax(s);
          for (int64_t j = 0; j < S_; ++j) {
            ASSERT_NEAR(got.values[0][row + j], p[j], 1e-6)
                << b << "," << h << "," << i << "," << j;
            if (s[j] == kLowest) {
              ASSERT_EQ(got.values[0][row + j], 0.f) << "a hidden key";
            }
          }
        }
  }
#ifdef MOETRACE_BACKEND_CUDA
  Outputs cuda(DType act, cudaStream_t s) const override {
    auto sc = to_device(scores_, DType::kF32), bias = to_device(bias_, DType::kF32);
    auto mask = to_device_raw(mask_);
    DeviceBuffer probs(scores_.size() * 4);
    cuda::attention_softmax(sc.as<float>(), bias.as<float>(), mask.as<int32_t>(), causal_, B_, H_,
                            S_, S_, probs.get(), act, s);
    return {{from_device(probs, scores_.size(), act)}, {}};
  }
#endif

 private:
  int64_t B_, H_, S_;
  bool causal_;
  std::vector<float> scores_, bias_;
  std::vector<int32_t> mask_;
};

// The plain loop of attention over strided q/k/v: query row (b, i) attends over keys j of
// sequence b with score q·k + bias(h, i, j), hidden(b, i, j) keys getting kLowest.
struct PlainAttention {
  int64_t B, H, Sq, Sk, dk;
  const float* q;
  int64_t ldq;
  const float* k;
  const float* v;
  int64_t ldkv, kv_bstride, ldctx;
  std::function<double(int64_t h, int64_t i, int64_t j)> bias;
  std::function<bool(int64_t b, int64_t i, int64_t j)> hidden;

  std::vector<float> run() const {
    std::vector<float> ctx(static_cast<size_t>(B * Sq * ldctx), 0.f);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < H; ++h)
        for (int64_t i = 0; i < Sq; ++i) {
          const float* qr = q + (b * Sq + i) * ldq + h * dk;
          std::vector<double> s(static_cast<size_t>(Sk));
          for (int64_t j = 0; j < Sk; ++j) {
            const float* kr = k + b * kv_bstride + j * ldkv + h * dk;
            double acc = 0;
            for (int64_t c = 0; c < dk; ++c) acc += static_cast<double>(qr[c]) * kr[c];
            s[j] = hidden(b, i, j) ? kLowest : acc + bias(h, i, j);
          }
          const auto p = plain_softmax(s);
          for (int64_t c = 0; c < dk; ++c) {
            double acc = 0;
            for (int64_t j = 0; j < Sk; ++j)
              acc += p[j] * v[b * kv_bstride + j * ldkv + h * dk + c];
            ctx[(b * Sq + i) * ldctx + h * dk + c] = static_cast<float>(acc);
          }
        }
    return ctx;
  }
};

// Self-attention over packed qkv with the bidirectional bias and padding: flash_attention on the
// GPU where it runs (dk 64, bf16/f16), else the unfused path (batched GEMMs + attention_softmax).
// pairs (--precision faithful): flash_attention's probabilities and output as hi + lo pairs, against
// the attention computed in float32 on the same rounded q, k, v: within a few units of 2^-22
// (f16) or 2^-16 (bf16), where the unpaired kernel is ~2^-11 / 2^-8 away.
class AttentionCase : public OpCase {
 public:
  AttentionCase(int64_t B, int64_t S, int64_t H, int64_t dk, bool flash, bool pairs = false)
      : OpCase(std::string(flash ? "flash_attention" : "attention") + (pairs ? "_pairs" : "") +
               "_S" + std::to_string(S)),
        B_(B),
        S_(S),
        H_(H),
        dk_(dk),
        flash_(flash),
        pairs_(pairs),
        qkv_(random_vec(B * S * 3 * H * dk, 15, -0.5f, 0.5f)),
        bias_(random_vec(H * (2 * S - 1), 16)),
        mask_(padding_mask(B, S)) {}
  Outputs cpu(DType act) const override {
    const auto qkv = rounded(qkv_, act);
    std::vector<float> ctx(static_cast<size_t>(B_ * S_ * H_ * dk_));
    cpu::attention(qkv.data(), bias_.data(), mask_.data(), false, B_, S_, H_, dk_, ctx.data(),
                   pairs_ ? DType::kF32 : act);
    return {{ctx}, {}};
  }
  void check(const Outputs& got) const override {
    const int64_t inner = H_ * dk_, ld = 3 * inner;
    const PlainAttention plain{
        B_,
        H_,
        S_,
        S_,
        dk_,
        qkv_.data(),
        ld,
        qkv_.data() + inner,
        qkv_.data() + 2 * inner,
        ld,
        S_ * ld,
        inner,
        [&](int64_t h, int64_t i, int64_t j) {
          return double{bias_[h * (2 * S_ - 1) + j - i + S_ - 1]};
        },
        [&](int64_t b, int64_t, int64_t j) { return mask_[b * S_ + j] == 0; }};
    EXPECT_LT(rel_err(got.values[0], plain.run()), 1e-5);
  }
  double tolerance(DType act, size_t) const override {
    if (pairs_) return act == DType::kBF16 ? 4 * 0x1p-16 : 32 * 0x1p-22;
    return 2 * act_tol(act);
  }
  bool gpu_runs(DType act) const override {
#ifdef MOETRACE_BACKEND_CUDA
    return !flash_ || cuda::flash_attention_supported(dk_, S_, act);
#else
    return true;
#endif
  }
#ifdef MOETRACE_BACKEND_CUDA
  Outputs cuda(DType act, cudaStream_t s) const override {
    const int64_t inner = H_ * dk_, n = B_ * S_ * inner;
    auto qkv = to_device(rounded(qkv_, act), act), bias = to_device(bias_, DType::kF32);
    auto mask = to_device_raw(mask_);
    DeviceBuffer ctx(static_cast<size_t>(n * 4 * (pairs_ ? 2 : 1)));
    if (pairs_) {  // rows of [hi | lo], each inner wide: their sum is the output
      cuda::flash_attention(qkv.get(), bias.as<float>(), mask.as<int32_t>(), B_, S_, H_, dk_,
                            ctx.get(), act, s, true);
      const std::vector<float> both = from_device(ctx, static_cast<size_t>(2 * n), act);
      std::vector<float> sum(static_cast<size_t>(n));
      for (int64_t r = 0; r < B_ * S_; ++r)
        for (int64_t c = 0; c < inner; ++c)
          sum[r * inner + c] = both[r * 2 * inner + c] + both[r * 2 * inner + inner + c];
      return {{sum}, {}};
    }
    if (flash_) {
      cuda::flash_attention(qkv.get(), bias.as<float>(), mask.as<int32_t>(), B_, S_, H_, dk_,
                            ctx.get(), act, s);
    } else {
      unfused(qkv, bias, mask, ctx, act, s);
    }
    return {{from_device(ctx, n, act)}, {}};
  }

 private:
  void unfused(const DeviceBuffer& qkv, const DeviceBuffer& bias, const DeviceBuffer& mask,
               DeviceBuffer& ctx, DType act, cudaStream_t s) const {
    const int64_t n = B_ * H_, ld = 3 * H_ * dk_;
    cuda::Blas blas(s);
    DeviceBuffer scores(static_cast<size_t>(n * S_ * S_ * 4)), probs(scores.bytes()),
        ptrs(6 * static_cast<size_t>(n) * sizeof(void*));
    auto** tab = ptrs.as<void*>();
    auto in = [](void** p) { return const_cast<const void**>(p); };
    const cuda::AttentionPointers p{in(tab),     in(tab + n),     in(tab + 2 * n),
                                    tab + 3 * n, in(tab + 4 * n), tab + 5 * n};
    cuda::attention_pointers(qkv.get(), scores.as<float>(), probs.get(), ctx.get(), B_, S_, H_, dk_,
                             act, p, s);
    blas.batched_nt(n, S_, S_, dk_, p.q, ld, p.k, ld, p.scores, S_, act, DType::kF32);
    cuda::attention_softmax(scores.as<float>(), bias.as<float>(), mask.as<int32_t>(), false, B_, H_,
                            S_, S_, probs.get(), act, s);
    blas.batched_nn(n, S_, dk_, S_, p.probs, S_, p.v, ld, p.ctx, H_ * dk_, act, act);
  }
#endif

 private:
  int64_t B_, S_, H_, dk_;
  bool flash_, pairs_;
  std::vector<float> qkv_, bias_;
  std::vector<int32_t> mask_;
};

// decode_attention: a generation step over a strided KV cache (causal, distance bias), a
// teacher-forced causal pass, cross-attention (padding mask, non-causal); odd head sizes and row
// strides; ctx's padding columns must stay untouched.
class DecodeAttentionCase : public OpCase {
 public:
  struct Shape {
    int64_t B, H, dk, Sq, Sk,
        cache_len;  // keys live in a [B, cache_len] cache; Sk of them are used
    bool causal, bias, mask;
  };
  DecodeAttentionCase(std::string name, Shape k)
      : OpCase("decode_attention_" + name),
        k_(k),
        inner_(k.H * k.dk),
        ldq_(inner_ + 5),
        ldctx_(inner_ + 3),
        ldkv_(2 * inner_ + 16),
        kv_bstride_(k.cache_len * ldkv_),
        q_(random_vec(k.B * k.Sq * ldq_, 20, -0.5f, 0.5f)),
        kv_(random_vec(k.B * kv_bstride_, 21, -0.5f, 0.5f)),
        bias_(random_vec(k.H * k.cache_len, 22, -1, 1)),
        mask_(padding_mask(k.B, k.Sk)) {}
  Outputs cpu(DType act) const override {
    const auto q = rounded(q_, act), kv = rounded(kv_, act);
    std::vector<float> ctx(static_cast<size_t>(k_.B * k_.Sq * ldctx_), 0.f);
    cpu::decode_attention(q.data(), ldq_, kv.data(), kv.data() + inner_, ldkv_, kv_bstride_,
                          k_.bias ? bias_.data() : nullptr, k_.cache_len,
                          k_.mask ? mask_.data() : nullptr, k_.causal, k_.B, k_.H, k_.Sq, k_.Sk,
                          k_.dk, ctx.data(), ldctx_, act);
    return {{ctx}, {padding_written(ctx)}};
  }
  void check(const Outputs& got) const override {
    const int64_t shift = k_.Sk - k_.Sq;  // query i sits at position i + shift
    const PlainAttention plain{
        k_.B,
        k_.H,
        k_.Sq,
        k_.Sk,
        k_.dk,
        q_.data(),
        ldq_,
        kv_.data(),
        kv_.data() + inner_,
        ldkv_,
        kv_bstride_,
        ldctx_,
        [&](int64_t h, int64_t i, int64_t j) {
          const int64_t behind = i + shift - j;
          return k_.bias && behind >= 0 ? double{bias_[h * k_.cache_len + behind]} : 0.0;
        },
        [&](int64_t b, int64_t i, int64_t j) {
          return (k_.mask && mask_[b * k_.Sk + j] == 0) || (k_.causal && j > i + shift);
        }};
    EXPECT_LT(rel_err(got.values[0], plain.run()), 1e-5);
    EXPECT_EQ(got.exact[0], std::vector<int32_t>{0}) << "ctx's padding columns stay untouched";
  }
  double tolerance(DType act, size_t) const override { return 2 * act_tol(act); }
#ifdef MOETRACE_BACKEND_CUDA
  Outputs cuda(DType act, cudaStream_t s) const override {
    auto q = to_device(rounded(q_, act), act), kv = to_device(rounded(kv_, act), act);
    auto bias = to_device(bias_, DType::kF32);
    auto mask = to_device_raw(mask_);
    const int64_t n = k_.B * k_.Sq * ldctx_;
    auto ctx = to_device(std::vector<float>(static_cast<size_t>(n), 0.f), act);
    cuda::decode_attention(q.get(), ldq_, kv.get(), kv.as<uint8_t>() + inner_ * cuda::act_size(act),
                           ldkv_, kv_bstride_, k_.bias ? bias.as<float>() : nullptr, k_.cache_len,
                           k_.mask ? mask.as<int32_t>() : nullptr, k_.causal, k_.B, k_.H, k_.Sq,
                           k_.Sk, k_.dk, ctx.get(), ldctx_, act, s);
    const auto got = from_device(ctx, n, act);
    return {{got}, { padding_written(got) }};
  }
#endif

 private:
  // [1]: how many of ctx's padding columns (inner .. ldctx-1 of each row) are not 0.
  std::vector<int32_t> padding_written(const std::vector<float>& ctx) const {
    int32_t n = 0;
    for (int64_t r = 0; r < k_.B * k_.Sq; ++r) {
      for (int64_t c = inner_; c < ldctx_; ++c) n += ctx[r * ldctx_ + c] != 0.f;
    }
    return {n};
  }
  Shape k_;
  int64_t inner_, ldq_, ldctx_, ldkv_, kv_bstride_;
  std::vector<float> q_, kv_, bias_;
  std::vector<int32_t> mask_;
};

// ---- greedy pick --------------------------------------------------------------------------------

// First maximum (ties to the lowest index), the banned eos, finished sequences padded.
class GreedyPickCase : public OpCase {
 public:
  explicit GreedyPickCase(int32_t banned)
      : OpCase(banned < 0 ? "greedy_pick" : "greedy_pick_banned_" + std::to_string(banned)),
        banned_(banned),
        logits_(random_vec(kB * kV, 23, -4, 4)) {
    logits_[1 * kV + 200] = logits_[1 * kV + 500] = 9.f;  // a tie: 200 wins
    logits_[2 * kV + kEos] = 9.f;                         // eos is the best: finished unless banned
    logits_[3 * kV + 17] = 9.f;      // finished before: pad whatever the logits
    logits_[4 * kV + kV - 1] = 9.f;  // the last column
    for (int64_t j = 0; j < kV; ++j) logits_[5 * kV + j] = -INFINITY;  // all -inf: the first token
  }
  // exact: ids, finished.
  Outputs cpu(DType) const override {
    std::vector<uint8_t> finished = finished0();
    std::vector<int32_t> ids(kB);
    cpu::greedy_pick(logits_.data(), kB, kV, banned_, kEos, kPad, finished.data(), ids.data());
    return {{}, {ids, std::vector<int32_t>(finished.begin(), finished.end())}};
  }
  void check(const Outputs& got) const override {
    const auto& ids = got.exact[0];
    EXPECT_EQ(ids[1], 200);
    EXPECT_EQ(ids[2] == kEos, banned_ < 0);
    EXPECT_EQ(ids[3], kPad);
    EXPECT_EQ(ids[4], kV - 1);
    EXPECT_EQ(ids[5], 0);
    for (int64_t b : {0, 6}) {
      const float* l = logits_.data() + b * kV;
      EXPECT_EQ(ids[b], std::max_element(l, l + kV) - l);
    }
    EXPECT_EQ(got.exact[1], (std::vector<int32_t>{0, 0, banned_ < 0, 1, 0, 0, 0}));
  }
  bool gpu_runs(DType act) const override { return act == DType::kF32; }  // no activation dtype
#ifdef MOETRACE_BACKEND_CUDA
  Outputs cuda(DType, cudaStream_t s) const override {
    auto fin = to_device_raw(finished0());
    auto l = to_device(logits_, DType::kF32);
    DeviceBuffer ids(kB * 4);
    cuda::greedy_pick(l.as<float>(), kB, kV, banned_, kEos, kPad, fin.as<uint8_t>(),
                      ids.as<int32_t>(), s);
    return {{}, { from_device_raw<int32_t>(ids, kB), as_i32(from_device_raw<uint8_t>(fin, kB)) }};
  }
#endif

 private:
  static constexpr int64_t kB = 7, kV = 1037;
  static constexpr int32_t kEos = 1, kPad = 0;
  static std::vector<uint8_t> finished0() { return {0, 0, 0, 1, 0, 0, 0}; }
  int32_t banned_;
  std::vector<float> logits_;
};

// ---- mixture of experts -------------------------------------------------------------------------

// Router logits with planted exact ties and one dominant expert, so capacity drops happen.
std::vector<float> router_logits(int64_t T, int64_t E, uint64_t seed) {
  auto l = random_vec(T * E, seed, -2, 2);
  for (int64_t t = 0; t < T; ++t) {
    if (t % 5 == 0) l[t * E + 3] += 3.f;                      // expert 3 overfills
    if (t % 7 == 0) l[t * E + 1] = l[t * E + (E - 2)] = 9.f;  // an exact tie: lowest index wins
  }
  return l;
}

struct Routing {
  std::vector<int32_t> expert, counts;
  std::vector<uint8_t> dropped;
  std::vector<float> gate;
};

Routing cpu_route(const std::vector<float>& logits, int64_t B, int64_t S, int64_t E, int64_t cap,
                  DType act) {
  Routing r{std::vector<int32_t>(static_cast<size_t>(B * S)),
            std::vector<int32_t>(static_cast<size_t>(E)),
            std::vector<uint8_t>(static_cast<size_t>(B * S)),
            std::vector<float>(static_cast<size_t>(B * S))};
  cpu::moe_route(logits.data(), B, S, E, cap, act, r.expert.data(), r.dropped.data(), r.gate.data(),
                 r.counts.data());
  return r;
}

class MoeRouteCase : public OpCase {
 public:
  MoeRouteCase(int64_t B, int64_t S, int64_t E, int64_t cap)
      : OpCase("moe_route_E" + std::to_string(E)),
        B_(B),
        S_(S),
        E_(E),
        cap_(cap),
        logits_(router_logits(B * S, E, 6)) {}
  // values: gate; exact: expert, dropped, counts.
  Outputs cpu(DType act) const override {
    Routing r = cpu_route(logits_, B_, S_, E_, cap_, act);
    return {{r.gate}, {r.expert, as_i32(r.dropped), r.counts}};
  }
  void check(const Outputs& got) const override {
    const auto &expert = got.exact[0], &dropped = got.exact[1], &counts = got.exact[2];
    std::vector<int32_t> want_counts(static_cast<size_t>(E_), 0);
    for (int64_t b = 0; b < B_; ++b) {
      std::vector<int64_t> seen(static_cast<size_t>(E_), 0);
      for (int64_t s = 0; s < S_; ++s) {
        const int64_t t = b * S_ + s;
        const float* l = logits_.data() + t * E_;
        const int64_t best = std::max_element(l, l + E_) - l;  // the first maximum
        ASSERT_EQ(expert[t], best) << "token " << t;
        if (t % 7 == 0) {
          ASSERT_EQ(expert[t], 1) << "a tie goes to the lowest index";
        }
        double sum = 0;
        for (int64_t e = 0; e < E_; ++e) sum += std::exp(double{l[e]} - l[best]);
        ASSERT_NEAR(got.values[0][t], 1 / sum, 1e-6);
        ASSERT_EQ(dropped[t], seen[best]++ >= cap_ ? 1 : 0) << "token " << t;
        want_counts[best] += dropped[t] ? 0 : 1;
      }
    }
    EXPECT_EQ(counts, want_counts);
    EXPECT_GT(std::accumulate(dropped.begin(), dropped.end(), 0), 0) << "the case should drop";
  }
#ifdef MOETRACE_BACKEND_CUDA
  Outputs cuda(DType act, cudaStream_t s) const override {
    const int64_t T = B_ * S_;
    auto l = to_device(logits_, DType::kF32);
    DeviceBuffer expert(T * 4), dropped(T), gate(T * 4), counts(E_ * 4);
    MT_CUDA_CHECK(cudaMemsetAsync(counts.get(), 0, E_ * 4, s));
    cuda::moe_route(l.as<float>(), B_, S_, E_, cap_, act, expert.as<int32_t>(),
                    dropped.as<uint8_t>(), gate.as<float>(), counts.as<int32_t>(), nullptr, s);
    return {{from_device_raw<float>(gate, T)},
            { from_device_raw<int32_t>(expert, T),
              as_i32(from_device_raw<uint8_t>(dropped, T)),
              from_device_raw<int32_t>(counts, E_) }};
  }
#endif

 private:
  int64_t B_, S_, E_, cap_;
  std::vector<float> logits_;
};

// route -> expert FFN: x[t] += gate[t] · (act(relu(h[t]·Wi[e]ᵀ)) · Wo[e]ᵀ) for kept tokens. On the
// GPU: route, plan, permute, grouped wi (ReLU), grouped wo (gate, un-permute, residual add).
class MoeFfnCase : public OpCase {
 public:
  MoeFfnCase(int64_t B, int64_t S, int64_t E, int64_t cap, int64_t K, int64_t F)
      : OpCase("moe_ffn_K" + std::to_string(K) + "_F" + std::to_string(F)),
        B_(B),
        S_(S),
        E_(E),
        cap_(cap),
        K_(K),
        F_(F),
        T_(B * S),
        logits_(router_logits(B * S, E, 7)),
        h_(random_vec(T_ * K, 8)),
        wi_(random_vec(E * F * K, 9, -0.2f, 0.2f)),
        wo_(random_vec(E * K * F, 10, -0.2f, 0.2f)),
        x0_(random_vec(T_ * K, 11)) {}
  // values: x - x0.
  Outputs cpu(DType act) const override {
    const auto h = rounded(h_, act), wi = rounded(wi_, act), wo = rounded(wo_, act);
    const Routing r = cpu_route(logits_, B_, S_, E_, cap_, act);
    std::vector<float> x = x0_;
    auto weights = [&](int64_t e, std::vector<float>&, std::vector<float>&) {
      return cpu::ExpertWeights{wi.data() + e * F_ * K_, wo.data() + e * K_ * F_};
    };
    cpu::moe_ffn(h.data(), T_, K_, F_, E_, weights, r.expert.data(), r.dropped.data(),
                 r.gate.data(), act, x.data());
    return {{delta(x)}, {}};
  }
  void check(const Outputs& got) const override {
    const Routing r = cpu_route(logits_, B_, S_, E_, cap_, DType::kF32);
    std::vector<float> want(static_cast<size_t>(T_ * K_), 0.f), inner(static_cast<size_t>(F_));
    for (int64_t t = 0; t < T_; ++t) {
      if (r.dropped[t]) continue;  // nothing added: carried by the residual
      const int64_t e = r.expert[t];
      for (int64_t f = 0; f < F_; ++f) {
        double acc = 0;
        for (int64_t k = 0; k < K_; ++k) acc += double{h_[t * K_ + k]} * wi_[(e * F_ + f) * K_ + k];
        inner[f] = std::max(static_cast<float>(acc), 0.f);
      }
      for (int64_t k = 0; k < K_; ++k) {
        double acc = 0;
        for (int64_t f = 0; f < F_; ++f) acc += double{inner[f]} * wo_[(e * K_ + k) * F_ + f];
        want[t * K_ + k] = r.gate[t] * static_cast<float>(acc);
      }
    }
    EXPECT_LT(rel_err(got.values[0], want), 1e-5);
    for (int64_t t = 0; t < T_; ++t) {
      if (r.dropped[t]) {
        ASSERT_EQ(got.values[0][t * K_], 0.f) << "dropped token " << t;
      }
    }
  }
  double tolerance(DType act, size_t) const override { return act == DType::kF32 ? 1e-5 : 1e-2; }
  // bf16 probabilities tie more often (lowest index wins): a few tokens change expert.
  double act_drift(DType act) const override {
    return act == DType::kBF16 ? 0.1 : OpCase::act_drift(act);
  }
#ifdef MOETRACE_BACKEND_CUDA
  Outputs cuda(DType act, cudaStream_t s) const override {
    const int tile_m = cuda::grouped_tile_m(act);
    const int64_t T = T_, E = E_, max_tiles = (T + tile_m - 1) / tile_m + E;
    auto l = to_device(logits_, DType::kF32), h = to_device(rounded(h_, act), act),
         wi = to_device(rounded(wi_, act), act), wo = to_device(rounded(wo_, act), act),
         x = to_device(x0_, DType::kF32);
    DeviceBuffer expert(T * 4), dropped(T), gate(T * 4), counts(E * 4), offsets((E + 1) * 4),
        cursor(E * 4), perm(T * 4), tile_e(max_tiles * 4), tile_r(max_tiles * 4), inner(T * F_ * 4);
    MT_CUDA_CHECK(cudaMemsetAsync(counts.get(), 0, E * 4, s));
    cuda::moe_route(l.as<float>(), B_, S_, E, cap_, act, expert.as<int32_t>(),
                    dropped.as<uint8_t>(), gate.as<float>(), counts.as<int32_t>(), nullptr, s);
    cuda::moe_plan(counts.as<int32_t>(), E, tile_m, max_tiles, offsets.as<int32_t>(),
                   tile_e.as<int32_t>(), tile_r.as<int32_t>(), cursor.as<int32_t>(), s);
    cuda::moe_permute(expert.as<int32_t>(), dropped.as<uint8_t>(), T, offsets.as<int32_t>(),
                      cursor.as<int32_t>(), perm.as<int32_t>(), s);
    cuda::grouped_gemm(h.get(), K_, true, perm.as<int32_t>(), wi.get(), F_, K_,
                       tile_e.as<int32_t>(), tile_r.as<int32_t>(), offsets.as<int32_t>(), max_tiles,
                       cuda::GroupedEpilogue::kRelu, inner.get(), F_, nullptr, act, s);
    cuda::grouped_gemm(inner.get(), F_, false, perm.as<int32_t>(), wo.get(), K_, F_,
                       tile_e.as<int32_t>(), tile_r.as<int32_t>(), offsets.as<int32_t>(), max_tiles,
                       cuda::GroupedEpilogue::kGateResidual, x.get(), K_, gate.as<float>(), act, s);
    return {{delta(from_device(x, T * K_, DType::kF32))}, {}};
  }
#endif

 private:
  std::vector<float> delta(std::vector<float> x) const {
    for (size_t i = 0; i < x.size(); ++i) x[i] -= x0_[i];
    return x;
  }
  int64_t B_, S_, E_, cap_, K_, F_, T_;
  std::vector<float> logits_, h_, wi_, wo_, x0_;
};

// ---- language models ----------------------------------------------------------------------------

// q/k preparation of one LM layer: bias, clip, q/k norms, RoPE, the scale; q rows and k | v rows
// into a strided cache [B, Smax, 2*KV*hd + pad] at position t0.
class LmQkvRopeCase : public OpCase {
 public:
  struct Shape {
    int64_t B, Sq, H, KV, hd;
    cpu::QkNormKind norm;
    bool bias;
    float clip;
  };
  LmQkvRopeCase(std::string name, Shape k)
      : OpCase("lm_qkv_rope_" + name),
        k_(k),
        cols_((k.H + 2 * k.KV) * k.hd),
        ldq_(k.H * k.hd + 3),
        ldkv_(2 * k.KV * k.hd + 8),
        smax_(k.Sq + kT0 + 2),
        qkv_(random_vec(k.B * k.Sq * cols_, 30, -2, 2)),
        bias_(random_vec(cols_, 31, -0.5f, 0.5f)),
        qn_(random_vec(k.norm == cpu::QkNormKind::kFull ? k.H * k.hd : k.hd, 32, 0.5f, 1.5f)),
        kn_(random_vec(k.norm == cpu::QkNormKind::kFull ? k.KV * k.hd : k.hd, 33, 0.5f, 1.5f)) {
    for (int64_t t = 0; t < k.B * k.Sq; ++t) pos_.push_back(static_cast<int32_t>((t * 37) % kP));
    std::vector<float> inv(static_cast<size_t>(k.hd / 2));
    for (int64_t c = 0; c < k.hd / 2; ++c)
      inv[c] = 1.0f / std::pow(static_cast<float>(kTheta), static_cast<float>(2 * c) / k.hd) /
               static_cast<float>(kFactor);
    cpu::rope_table(inv, kP, cos_, sin_);
  }
  // values: q rows, the cache.
  Outputs cpu(DType act) const override {
    std::vector<float> q(static_cast<size_t>(k_.B * k_.Sq * ldq_), 0.f),
        kv(static_cast<size_t>(k_.B * smax_ * ldkv_), 0.f);
    cpu::lm_qkv_rope(qkv_.data(), k_.bias ? bias_.data() : nullptr, k_.clip, k_.norm, qn_.data(),
                     kn_.data(), kEps, pos_.data(), cos_.data(), sin_.data(), kScale, k_.B, k_.Sq,
                     k_.H, k_.KV, k_.hd, q.data(), ldq_, kv.data(), ldkv_, smax_ * ldkv_, kT0, act);
    return {{q, kv}, {}};
  }
  // A plain loop in double: transformers' order of operations, its rope angles from scratch.
  void check(const Outputs& got) const override {
    const int64_t H = k_.H, KV = k_.KV, hd = k_.hd, half = hd / 2, qn = H * hd, kn = KV * hd;
    std::vector<float> want_q(got.values[0].size(), 0.f), want_kv(got.values[1].size(), 0.f);
    auto rms = [&](std::vector<double>& x, int64_t off, int64_t n, const std::vector<float>& w) {
      double ss = 0;
      for (int64_t c = 0; c < n; ++c) ss += x[off + c] * x[off + c];
      const double scale = 1 / std::sqrt(ss / static_cast<double>(n) + kEps);
      for (int64_t c = 0; c < n; ++c) x[off + c] = w[c % w.size()] * x[off + c] * scale;
    };
    for (int64_t t = 0; t < k_.B * k_.Sq; ++t) {
      std::vector<double> x(static_cast<size_t>(cols_));
      for (int64_t c = 0; c < cols_; ++c) {
        x[c] = qkv_[t * cols_ + c] + (k_.bias ? double{bias_[c]} : 0.0);
      }
      if (k_.norm == cpu::QkNormKind::kFull) {
        rms(x, 0, qn, qn_);
        rms(x, qn, kn, kn_);
      } else if (k_.norm == cpu::QkNormKind::kPerHead) {
        for (int64_t hh = 0; hh < H + KV; ++hh) rms(x, hh * hd, hd, hh < H ? qn_ : kn_);
      }
      if (k_.clip > 0)
        for (double& v : x) v = std::clamp<double>(v, -k_.clip, k_.clip);
      const int64_t b = t / k_.Sq, s = t % k_.Sq;
      for (int64_t hh = 0; hh < H + KV; ++hh) {
        for (int64_t c = 0; c < half; ++c) {
          const double inv = 1 / std::pow(kTheta, 2.0 * c / hd) / kFactor;
          const double a = pos_[t] * inv;
          const double x1 = x[hh * hd + c], x2 = x[hh * hd + c + half];
          const double y1 = x1 * std::cos(a) - x2 * std::sin(a);
          const double y2 = x2 * std::cos(a) + x1 * std::sin(a);
          if (hh < H) {
            want_q[t * ldq_ + hh * hd + c] = static_cast<float>(y1 * kScale);
            want_q[t * ldq_ + hh * hd + c + half] = static_cast<float>(y2 * kScale);
          } else {
            float* kr = want_kv.data() + b * smax_ * ldkv_ + (kT0 + s) * ldkv_ + (hh - H) * hd;
            kr[c] = static_cast<float>(y1);
            kr[c + half] = static_cast<float>(y2);
          }
        }
      }
      float* vr = want_kv.data() + b * smax_ * ldkv_ + (kT0 + s) * ldkv_ + kn;
      for (int64_t c = 0; c < kn; ++c) vr[c] = static_cast<float>(x[qn + kn + c]);
    }
    // float32 angles of positions up to kP: about 1e-5 of a radian apart from double ones.
    EXPECT_LT(rel_err(got.values[0], want_q), 2e-5);
    EXPECT_LT(rel_err(got.values[1], want_kv), 2e-5);
  }
  double tolerance(DType act, size_t) const override {
    return act == DType::kF32 ? 1e-6 : 2 * act_tol(act);
  }
#ifdef MOETRACE_BACKEND_CUDA
  Outputs cuda(DType act, cudaStream_t s) const override {
    auto qkv = to_device(qkv_, DType::kF32), bias = to_device(bias_, DType::kF32),
         qn = to_device(qn_, DType::kF32), kn = to_device(kn_, DType::kF32),
         co = to_device(cos_, DType::kF32), si = to_device(sin_, DType::kF32);
    auto pos = to_device_raw(pos_);
    const int64_t nq = k_.B * k_.Sq * ldq_, nkv = k_.B * smax_ * ldkv_;
    auto q = to_device(std::vector<float>(static_cast<size_t>(nq), 0.f), act);
    auto kv = to_device(std::vector<float>(static_cast<size_t>(nkv), 0.f), act);
    cuda::lm_qkv_rope(qkv.as<float>(), k_.bias ? bias.as<float>() : nullptr, k_.clip,
                      static_cast<cuda::QkNormKind>(k_.norm), qn.as<float>(), kn.as<float>(), kEps,
                      pos.as<int32_t>(), co.as<float>(), si.as<float>(), kScale, k_.B, k_.Sq, k_.H,
                      k_.KV, k_.hd, q.get(), ldq_, kv.get(), ldkv_, smax_ * ldkv_, kT0, act, s);
    return {{from_device(q, nq, act), from_device(kv, nkv, act)}, {}};
  }
#endif

 private:
  static constexpr int64_t kP = 300, kT0 = 3;
  static constexpr double kTheta = 10000.0, kFactor = 2.0;
  static constexpr float kEps = 1e-6f, kScale = 0.125f;
  Shape k_;
  int64_t cols_, ldq_, ldkv_, smax_;
  std::vector<float> qkv_, bias_, qn_, kn_, cos_, sin_;
  std::vector<int32_t> pos_;
};

// Causal grouped-query attention over a strided cache: the prompt pass (Sq = Sk) with padding, a
// generation step (Sq = 1), the sliding window.
class LmAttentionCase : public OpCase {
 public:
  struct Shape {
    int64_t B, H, KV, hd, Sq, Sk, window;
    bool mask;
  };
  LmAttentionCase(std::string name, Shape k)
      : OpCase("lm_attention_" + name),
        k_(k),
        ldq_(k.H * k.hd + 5),
        ldctx_(k.H * k.hd + 3),
        ldkv_(2 * k.KV * k.hd + 16),
        kv_bstride_((k.Sk + 4) * ldkv_),
        q_(random_vec(k.B * k.Sq * ldq_, 40, -0.5f, 0.5f)),
        kv_(random_vec(k.B * kv_bstride_, 41, -0.5f, 0.5f)),
        mask_(strided_mask(k.B, k.Sk, kMaskPad)) {}
  Outputs cpu(DType act) const override {
    const auto q = rounded(q_, act), kv = rounded(kv_, act);
    std::vector<float> ctx(static_cast<size_t>(k_.B * k_.Sq * ldctx_), 0.f);
    cpu::lm_attention(q.data(), ldq_, kv.data(), kv.data() + k_.KV * k_.hd, ldkv_, kv_bstride_,
                      k_.mask ? mask_.data() : nullptr, k_.Sk + kMaskPad, k_.window, k_.B, k_.H,
                      k_.KV, k_.Sq, k_.Sk, k_.hd, ctx.data(), ldctx_, act);
    return {{ctx}, {}};
  }
  void check(const Outputs& got) const override {
    const int64_t G = k_.H / k_.KV, hd = k_.hd;
    std::vector<float> want(got.values[0].size(), 0.f);
    for (int64_t b = 0; b < k_.B; ++b)
      for (int64_t h = 0; h < k_.H; ++h)
        for (int64_t i = 0; i < k_.Sq; ++i) {
          const int64_t pos = i + k_.Sk - k_.Sq;
          const float* qr = q_.data() + (b * k_.Sq + i) * ldq_ + h * hd;
          std::vector<double> s;
          std::vector<int64_t> keys;
          for (int64_t j = 0; j <= pos; ++j) {
            if (k_.window > 0 && pos - j >= k_.window) continue;
            const float* kr = kv_.data() + b * kv_bstride_ + j * ldkv_ + (h / G) * hd;
            double acc = 0;
            for (int64_t c = 0; c < hd; ++c) acc += double{qr[c]} * kr[c];
            s.push_back(k_.mask && mask_[b * (k_.Sk + kMaskPad) + j] == 0 ? kLowest : acc);
            keys.push_back(j);
          }
          const auto p = plain_softmax(s);
          for (int64_t c = 0; c < hd; ++c) {
            double acc = 0;
            for (size_t u = 0; u < keys.size(); ++u)
              acc += p[u] * kv_[b * kv_bstride_ + keys[u] * ldkv_ + k_.KV * hd + (h / G) * hd + c];
            want[(b * k_.Sq + i) * ldctx_ + h * hd + c] = static_cast<float>(acc);
          }
        }
    EXPECT_LT(rel_err(got.values[0], want), 1e-5);
  }
  double tolerance(DType act, size_t) const override { return 2 * act_tol(act); }
#ifdef MOETRACE_BACKEND_CUDA
  Outputs cuda(DType act, cudaStream_t s) const override {
    auto q = to_device(rounded(q_, act), act), kv = to_device(rounded(kv_, act), act);
    auto mask = to_device_raw(mask_);
    const int64_t n = k_.B * k_.Sq * ldctx_;
    auto ctx = to_device(std::vector<float>(static_cast<size_t>(n), 0.f), act);
    cuda::lm_attention(q.get(), ldq_, kv.get(),
                       kv.as<uint8_t>() + k_.KV * k_.hd * cuda::act_size(act), ldkv_, kv_bstride_,
                       k_.mask ? mask.as<int32_t>() : nullptr, k_.Sk + kMaskPad, k_.window, k_.B,
                       k_.H, k_.KV, k_.Sq, k_.Sk, k_.hd, ctx.get(), ldctx_, act, s);
    return {{from_device(ctx, n, act)}, {}};
  }
#endif

 private:
  // The mask rows are Sk + kMaskPad wide (a KV cache's mask, [B, Smax]); the pad columns hide
  // everything, so reading them would show.
  static constexpr int64_t kMaskPad = 5;
  static std::vector<int32_t> strided_mask(int64_t B, int64_t Sk, int64_t pad) {
    const auto m = padding_mask(B, Sk);
    std::vector<int32_t> out(static_cast<size_t>(B * (Sk + pad)), 0);
    for (int64_t b = 0; b < B; ++b)
      std::copy_n(m.begin() + b * Sk, Sk, out.begin() + b * (Sk + pad));
    return out;
  }
  Shape k_;
  int64_t ldq_, ldctx_, ldkv_, kv_bstride_;
  std::vector<float> q_, kv_;
  std::vector<int32_t> mask_;
};

// Router logits with planted exact ties among the top experts.
std::vector<float> topk_logits(int64_t T, int64_t E, uint64_t seed) {
  auto l = random_vec(T * E, seed, -3, 3);
  for (int64_t t = 0; t < T; ++t) {
    if (t % 3 == 0) l[t * E + (E - 1)] = l[t * E + 2] = l[t * E + (E / 2)] = 7.f;  // a 3-way tie
    if (t % 5 == 1) l[t * E + 0] = l[t * E + 1] = 6.f;
  }
  return l;
}

struct TopkRouting {
  std::vector<int32_t> expert, counts;
  std::vector<float> weight;
};
TopkRouting cpu_topk(const std::vector<float>& logits, int64_t T, int64_t E, int64_t k,
                     bool renorm) {
  TopkRouting r{std::vector<int32_t>(static_cast<size_t>(T * k)),
                std::vector<int32_t>(static_cast<size_t>(E)),
                std::vector<float>(static_cast<size_t>(T * k))};
  cpu::moe_topk(logits.data(), T, E, k, renorm, r.expert.data(), r.weight.data(), r.counts.data());
  return r;
}

class MoeTopkCase : public OpCase {
 public:
  MoeTopkCase(int64_t T, int64_t E, int64_t k, bool renorm)
      : OpCase("moe_topk_E" + std::to_string(E) + "_k" + std::to_string(k) +
               (renorm ? "_renorm" : "")),
        T_(T),
        E_(E),
        k_(k),
        renorm_(renorm),
        logits_(topk_logits(T, E, 42)) {}
  // values: weight; exact: expert, counts.
  Outputs cpu(DType) const override {
    TopkRouting r = cpu_topk(logits_, T_, E_, k_, renorm_);
    return {{r.weight}, {r.expert, r.counts}};
  }
  void check(const Outputs& got) const override {
    const auto &expert = got.exact[0], &counts = got.exact[1];
    std::vector<int32_t> want_counts(static_cast<size_t>(E_), 0);
    for (int64_t t = 0; t < T_; ++t) {
      const float* l = logits_.data() + t * E_;
      std::vector<int64_t> order(static_cast<size_t>(E_));
      std::iota(order.begin(), order.end(), int64_t{0});
      // Descending logit (the softmax is monotone), ties to the lowest index.
      std::stable_sort(order.begin(), order.end(),
                       [&](int64_t a, int64_t b) { return l[a] > l[b]; });
      double z = 0, top = 0;
      for (int64_t e = 0; e < E_; ++e) z += std::exp(double{l[e]} - l[order[0]]);
      for (int64_t j = 0; j < k_; ++j) top += std::exp(double{l[order[j]]} - l[order[0]]) / z;
      for (int64_t j = 0; j < k_; ++j) {
        ASSERT_EQ(expert[t * k_ + j], order[j]) << "token " << t << " slot " << j;
        const double p = std::exp(double{l[order[j]]} - l[order[0]]) / z;
        ASSERT_NEAR(got.values[0][t * k_ + j], renorm_ ? p / top : p, 1e-6);
        ++want_counts[order[j]];
      }
      if (t % 3 == 0 && k_ >= 3) {
        ASSERT_EQ(expert[t * k_], 2) << "a tie goes to the lowest index first";
      }
    }
    EXPECT_EQ(counts, want_counts);
  }
  bool gpu_runs(DType act) const override { return act == DType::kF32; }  // float32 in any mode
#ifdef MOETRACE_BACKEND_CUDA
  Outputs cuda(DType, cudaStream_t s) const override {
    auto l = to_device(logits_, DType::kF32);
    DeviceBuffer expert(T_ * k_ * 4), weight(T_ * k_ * 4), counts(E_ * 4);
    MT_CUDA_CHECK(cudaMemsetAsync(counts.get(), 0, E_ * 4, s));
    cuda::moe_topk(l.as<float>(), T_, E_, k_, renorm_, expert.as<int32_t>(), weight.as<float>(),
                   counts.as<int32_t>(), s);
    return {{from_device_raw<float>(weight, T_ * k_)},
            { from_device_raw<int32_t>(expert, T_ * k_),
              from_device_raw<int32_t>(counts, E_) }};
  }
#endif

 private:
  int64_t T_, E_, k_;
  bool renorm_;
  std::vector<float> logits_;
};

// top-k route -> SwiGLU experts -> combine (with a shared expert's output and gate):
//   x[t] += Σ_j act(w[t,j]) · down[e](act(silu(g)·u)) + sigmoid(sg[t]) · shared[t]
// On the GPU: moe_topk, moe_plan, moe_permute over the T*k slots, grouped gate|up GEMM (kSwiGlu),
// grouped down GEMM (kRows), moe_combine.
class MoeSwiGluCase : public OpCase {
 public:
  MoeSwiGluCase(int64_t T, int64_t E, int64_t k, int64_t d, int64_t F, bool shared)
      : OpCase("moe_swiglu_E" + std::to_string(E) + "_k" + std::to_string(k) +
               (shared ? "_shared" : "")),
        T_(T),
        E_(E),
        k_(k),
        d_(d),
        F_(F),
        shared_on_(shared),
        logits_(topk_logits(T, E, 43)),
        h_(random_vec(T * d, 44)),
        gate_up_(random_vec(E * 2 * F * d, 45, -0.3f, 0.3f)),
        down_(random_vec(E * d * F, 46, -0.3f, 0.3f)),
        shared_(random_vec(T * d, 47)),
        shared_gate_(random_vec(T, 48, -3, 3)),
        x0_(random_vec(T * d, 49)) {}
  // values: x - x0.
  Outputs cpu(DType act) const override {
    const auto h = rounded(h_, act), gu = rounded(gate_up_, act), dn = rounded(down_, act);
    const TopkRouting r = cpu_topk(logits_, T_, E_, k_, true);
    std::vector<float> rows(static_cast<size_t>(T_ * k_ * d_)), x = x0_;
    auto weights = [&](int64_t e, std::vector<float>&, std::vector<float>&) {
      return cpu::SwiGluWeights{gu.data() + e * 2 * F_ * d_, dn.data() + e * d_ * F_};
    };
    cpu::moe_swiglu_experts(h.data(), T_, d_, F_, E_, k_, weights, r.expert.data(), act,
                            rows.data());
    cpu::moe_combine(rows.data(), r.weight.data(), T_, k_, d_,
                     shared_on_ ? shared_.data() : nullptr,
                     shared_on_ ? shared_gate_.data() : nullptr, act, x.data());
    return {{delta(x)}, {}};
  }
  void check(const Outputs& got) const override {
    const TopkRouting r = cpu_topk(logits_, T_, E_, k_, true);
    std::vector<float> want(static_cast<size_t>(T_ * d_), 0.f);
    std::vector<double> mid(static_cast<size_t>(F_));
    for (int64_t t = 0; t < T_; ++t) {
      std::vector<double> acc(static_cast<size_t>(d_), 0.0);
      for (int64_t j = 0; j < k_; ++j) {
        const int64_t e = r.expert[t * k_ + j];
        const float* gu = gate_up_.data() + e * 2 * F_ * d_;
        for (int64_t f = 0; f < F_; ++f) {
          double g = 0, u = 0;
          for (int64_t c = 0; c < d_; ++c) {
            g += double{h_[t * d_ + c]} * gu[(2 * f) * d_ + c];
            u += double{h_[t * d_ + c]} * gu[(2 * f + 1) * d_ + c];
          }
          mid[f] = g / (1 + std::exp(-g)) * u;
        }
        for (int64_t c = 0; c < d_; ++c) {
          double o = 0;
          for (int64_t f = 0; f < F_; ++f) o += mid[f] * down_[(e * d_ + c) * F_ + f];
          acc[c] += r.weight[t * k_ + j] * o;
        }
      }
      const double sg = 1 / (1 + std::exp(-double{shared_gate_[t]}));
      for (int64_t c = 0; c < d_; ++c)
        want[t * d_ + c] =
            static_cast<float>(acc[c] + (shared_on_ ? sg * shared_[t * d_ + c] : 0.0));
    }
    EXPECT_LT(rel_err(got.values[0], want), 1e-5);
  }
  double tolerance(DType act, size_t) const override { return act == DType::kF32 ? 1e-5 : 1e-2; }
#ifdef MOETRACE_BACKEND_CUDA
  Outputs cuda(DType act, cudaStream_t s) const override {
    const int tile_m = cuda::grouped_tile_m(act);
    const int64_t n = T_ * k_, E = E_, max_tiles = n / tile_m + 1 + E;
    auto l = to_device(logits_, DType::kF32), h = to_device(rounded(h_, act), act),
         gu = to_device(rounded(gate_up_, act), act), dn = to_device(rounded(down_, act), act),
         sh = to_device(shared_, DType::kF32), sg = to_device(shared_gate_, DType::kF32),
         x = to_device(x0_, DType::kF32);
    DeviceBuffer expert(n * 4), weight(n * 4), counts(E * 4), offsets((E + 1) * 4), cursor(E * 4),
        perm(n * 4), tile_e(max_tiles * 4), tile_r(max_tiles * 4), mid(n * F_ * 4),
        rows(n * d_ * 4);
    MT_CUDA_CHECK(cudaMemsetAsync(counts.get(), 0, E * 4, s));
    cuda::moe_topk(l.as<float>(), T_, E, k_, true, expert.as<int32_t>(), weight.as<float>(),
                   counts.as<int32_t>(), s);
    cuda::moe_plan(counts.as<int32_t>(), E, tile_m, max_tiles, offsets.as<int32_t>(),
                   tile_e.as<int32_t>(), tile_r.as<int32_t>(), cursor.as<int32_t>(), s);
    cuda::moe_permute(expert.as<int32_t>(), nullptr, n, offsets.as<int32_t>(), cursor.as<int32_t>(),
                      perm.as<int32_t>(), s);
    cuda::grouped_gemm(h.get(), d_, true, perm.as<int32_t>(), gu.get(), 2 * F_, d_,
                       tile_e.as<int32_t>(), tile_r.as<int32_t>(), offsets.as<int32_t>(), max_tiles,
                       cuda::GroupedEpilogue::kSwiGlu, mid.get(), F_, nullptr, act, s, k_);
    cuda::grouped_gemm(mid.get(), F_, false, perm.as<int32_t>(), dn.get(), d_, F_,
                       tile_e.as<int32_t>(), tile_r.as<int32_t>(), offsets.as<int32_t>(), max_tiles,
                       cuda::GroupedEpilogue::kRows, rows.get(), d_, nullptr, act, s);
    cuda::moe_combine(rows.as<float>(), weight.as<float>(), T_, k_, d_,
                      shared_on_ ? sh.as<float>() : nullptr, shared_on_ ? sg.as<float>() : nullptr,
                      act, x.as<float>(), s);
    return {{delta(from_device(x, T_ * d_, DType::kF32))}, {}};
  }
#endif

 private:
  std::vector<float> delta(std::vector<float> x) const {
    for (size_t i = 0; i < x.size(); ++i) x[i] -= x0_[i];
    return x;
  }
  int64_t T_, E_, k_, d_, F_;
  bool shared_on_;
  std::vector<float> logits_, h_, gate_up_, down_, shared_, shared_gate_, x0_;
};

// The dense SwiGLU over interleaved gate | up columns.
class SwiGluCase : public OpCase {
 public:
  SwiGluCase(int64_t rows, int64_t F)
      : OpCase("swiglu_F" + std::to_string(F)),
        rows_(rows),
        F_(F),
        in_(random_vec(rows * 2 * F, 50, -4, 4)) {}
  Outputs cpu(DType act) const override {
    std::vector<float> out(static_cast<size_t>(rows_ * F_));
    cpu::swiglu(in_.data(), rows_, F_, out.data(), act);
    return {{out}, {}};
  }
  void check(const Outputs& got) const override {
    std::vector<float> want(static_cast<size_t>(rows_ * F_));
    for (int64_t i = 0; i < rows_ * F_; ++i) {
      const double g = in_[(i / F_) * 2 * F_ + 2 * (i % F_)],
                   u = in_[(i / F_) * 2 * F_ + 2 * (i % F_) + 1];
      want[i] = static_cast<float>(g / (1 + std::exp(-g)) * u);
    }
    EXPECT_LT(rel_err(got.values[0], want), 1e-6);
  }
#ifdef MOETRACE_BACKEND_CUDA
  Outputs cuda(DType act, cudaStream_t s) const override {
    auto in = to_device(in_, DType::kF32);
    DeviceBuffer out(static_cast<size_t>(rows_ * F_ * 4));
    cuda::swiglu(in.as<float>(), rows_, F_, out.get(), act, s);
    return {{from_device(out, rows_ * F_, act)}, {}};
  }
#endif

 private:
  int64_t rows_, F_;
  std::vector<float> in_;
};

// Random weights made on the device: the same values as the CPU's, in [lo, hi), spread out.
class FillUniformCase : public OpCase {
 public:
  explicit FillUniformCase(int64_t n) : OpCase("fill_uniform_" + std::to_string(n)), n_(n) {}
  Outputs cpu(DType act) const override {
    std::vector<float> v(static_cast<size_t>(n_));
    cpu::fill_uniform(v.data(), n_, act, kSeed, -0.5f, 0.25f);
    return {{v}, {}};
  }
  void check(const Outputs& got) const override {
    const auto& v = got.values[0];
    double mean = 0;
    for (float x : v) {
      ASSERT_GE(x, -0.5f);
      ASSERT_LT(x, 0.25f);
      mean += x;
    }
    EXPECT_NEAR(mean / static_cast<double>(n_), -0.125, 0.01) << "uniform over [lo, hi)";
    EXPECT_NE(v[0], v[1]);
  }
  double tolerance(DType, size_t) const override { return 0; }  // the same hash
#ifdef MOETRACE_BACKEND_CUDA
  Outputs cuda(DType act, cudaStream_t s) const override {
    DeviceBuffer v(static_cast<size_t>(n_ * 4));
    cuda::fill_uniform(v.get(), n_, act, kSeed, -0.5f, 0.25f, s);
    return {{from_device(v, n_, act)}, {}};
  }
#endif

 private:
  static constexpr uint64_t kSeed = 0x1234abcdull;
  int64_t n_;
};

// ---- gemm ---------------------------------------------------------------------------------------

// D = act(relu(A·Bᵀ)) (the GPU's ReLU epilogue into the activation dtype) and C += A·Bᵀ in
// float32, A and B in act.
class GemmCase : public OpCase {
 public:
  GemmCase(int64_t M, int64_t N, int64_t K)
      : OpCase("gemm_nt_" + std::to_string(M) + "x" + std::to_string(N) + "x" + std::to_string(K)),
        M_(M),
        N_(N),
        K_(K),
        a_(random_vec(M * K, 12)),
        b_(random_vec(N * K, 13)),
        c0_(random_vec(M * N, 14)) {}
  // values: relu output, accumulated output.
  Outputs cpu(DType act) const override {
    const auto a = rounded(a_, act), b = rounded(b_, act);
    std::vector<float> relu(static_cast<size_t>(M_ * N_)), acc = c0_;
    cpu::gemm_nt(M_, N_, K_, 1.0f, a.data(), K_, b.data(), K_, 0.0f, relu.data(), N_);
    cpu::relu_inplace(relu.data(), M_ * N_, act);
    cpu::gemm_nt(M_, N_, K_, 1.0f, a.data(), K_, b.data(), K_, 1.0f, acc.data(), N_);
    return {{relu, acc}, {}};
  }
  void check(const Outputs& got) const override {
    std::vector<float> prod(static_cast<size_t>(M_ * N_)), acc = c0_;
    cpu::gemm_nt_scalar(M_, N_, K_, 1.0f, a_.data(), K_, b_.data(), K_, 0.0f, prod.data(), N_);
    cpu::gemm_nt_scalar(M_, N_, K_, 1.0f, a_.data(), K_, b_.data(), K_, 1.0f, acc.data(), N_);
    for (auto& v : prod) v = std::max(v, 0.f);
    EXPECT_LT(rel_err(got.values[0], prod), 1e-6);
    EXPECT_LT(rel_err(got.values[1], acc), 1e-6);
  }
  double tolerance(DType act, size_t i) const override {
    return i == 1 ? (act == DType::kF32 ? 1e-6 : 1e-5) : act_tol(act);
  }
#ifdef MOETRACE_BACKEND_CUDA
  Outputs cuda(DType act, cudaStream_t s) const override {
    cuda::Blas blas(s);
    auto a = to_device(rounded(a_, act), act), b = to_device(rounded(b_, act), act),
         c = to_device(c0_, DType::kF32);
    DeviceBuffer relu(static_cast<size_t>(M_ * N_ * 4));
    blas.gemm_nt({M_, N_, K_, a.get(), K_, b.get(), K_, relu.get(), N_, act, act, false, true});
    blas.gemm_nt(
        {M_, N_, K_, a.get(), K_, b.get(), K_, c.get(), N_, act, DType::kF32, true, false});
    return {{from_device(relu, M_ * N_, act), from_device(c, M_ * N_, DType::kF32)}, {}};
  }
#endif

 private:
  int64_t M_, N_, K_;
  std::vector<float> a_, b_, c0_;
};

// ---- the table ----------------------------------------------------------------------------------

std::vector<std::shared_ptr<OpCase>> all_cases() {
  using DA = DecodeAttentionCase;
  return {
      std::make_shared<EmbedCase>(53, 45, 37),
      std::make_shared<RmsNormCase>(37, 771),
      std::make_shared<RmsNormCase>(37, 772),
      std::make_shared<AttentionSoftmaxCase>(3, 5, 37, false),
      std::make_shared<AttentionSoftmaxCase>(3, 5, 37, true),
      std::make_shared<AttentionCase>(3, 29, 3, 8, false),
      std::make_shared<AttentionCase>(3, 77, 2, 64, true),
      std::make_shared<AttentionCase>(3, 77, 2, 64, true, true),
      std::make_shared<DA>("step", DA::Shape{3, 3, 40, 1, 29, 37, true, true, false}),
      std::make_shared<DA>("step_first", DA::Shape{2, 2, 64, 1, 1, 5, true, true, false}),
      std::make_shared<DA>("teacher_forced", DA::Shape{3, 2, 8, 23, 23, 23, true, true, false}),
      std::make_shared<DA>("cross", DA::Shape{4, 3, 64, 5, 41, 41, false, false, true}),
      std::make_shared<DA>("cross_step", DA::Shape{5, 4, 24, 1, 67, 67, false, false, true}),
      std::make_shared<GreedyPickCase>(-1),
      std::make_shared<GreedyPickCase>(1),
      std::make_shared<MoeRouteCase>(5, 77, 19, 6),
      std::make_shared<MoeFfnCase>(5, 77, 19, 9, 72, 200),
      std::make_shared<GemmCase>(37, 93, 72),
      std::make_shared<GemmCase>(1, 7, 9),
      std::make_shared<LmQkvRopeCase>(
          "plain", LmQkvRopeCase::Shape{3, 13, 4, 2, 16, cpu::QkNormKind::kNone, false, 0.f}),
      std::make_shared<LmQkvRopeCase>(
          "bias", LmQkvRopeCase::Shape{2, 7, 6, 2, 10, cpu::QkNormKind::kNone, true, 0.f}),
      std::make_shared<LmQkvRopeCase>(
          "full_norm_clip",
          LmQkvRopeCase::Shape{3, 11, 4, 4, 24, cpu::QkNormKind::kFull, false, 1.5f}),
      std::make_shared<LmQkvRopeCase>(
          "head_norm", LmQkvRopeCase::Shape{2, 9, 8, 2, 64, cpu::QkNormKind::kPerHead, false, 0.f}),
      std::make_shared<LmQkvRopeCase>(
          "step", LmQkvRopeCase::Shape{5, 1, 4, 1, 128, cpu::QkNormKind::kPerHead, false, 0.f}),
      std::make_shared<LmAttentionCase>("prompt",
                                        LmAttentionCase::Shape{3, 4, 2, 16, 29, 29, 0, true}),
      std::make_shared<LmAttentionCase>("prompt_mha",
                                        LmAttentionCase::Shape{2, 3, 3, 64, 41, 41, 0, true}),
      std::make_shared<LmAttentionCase>("window",
                                        LmAttentionCase::Shape{2, 4, 1, 32, 37, 37, 9, true}),
      std::make_shared<LmAttentionCase>("step",
                                        LmAttentionCase::Shape{4, 8, 2, 128, 1, 45, 0, true}),
      std::make_shared<LmAttentionCase>("step_window",
                                        LmAttentionCase::Shape{3, 4, 2, 40, 1, 70, 16, false}),
      std::make_shared<LmAttentionCase>("head256",
                                        LmAttentionCase::Shape{2, 2, 1, 256, 13, 13, 0, true}),
      std::make_shared<MoeTopkCase>(301, 64, 8, false),
      std::make_shared<MoeTopkCase>(301, 64, 8, true),
      std::make_shared<MoeTopkCase>(97, 8, 2, true),
      std::make_shared<MoeTopkCase>(53, 256, 4, false),
      std::make_shared<MoeTopkCase>(45, 7, 1, false),
      std::make_shared<MoeSwiGluCase>(185, 19, 4, 72, 40, false),
      std::make_shared<MoeSwiGluCase>(131, 8, 2, 64, 96, true),
      std::make_shared<SwiGluCase>(37, 101),
      std::make_shared<FillUniformCase>(100003),
  };
}

// gtest prints a case by its name.
void PrintTo(const std::shared_ptr<OpCase>& c, std::ostream* os) { *os << c->name(); }

class BackendOps : public ::testing::TestWithParam<std::shared_ptr<OpCase>> {};

TEST_P(BackendOps, CpuMatchesPlainLoop) {
  const OpCase& c = *GetParam();
  c.check(c.cpu(DType::kF32));
}

// The CPU ops' bf16/f16 paths run without a GPU too: their results stay near the float32 ones.
TEST_P(BackendOps, CpuActRoundingStaysNearF32) {
  const OpCase& c = *GetParam();
  const Outputs f32 = c.cpu(DType::kF32);
  for (DType act : {DType::kBF16, DType::kF16}) {
    const Outputs got = c.cpu(act);
    ASSERT_EQ(got.values.size(), f32.values.size());
    for (size_t i = 0; i < f32.values.size(); ++i) {
      EXPECT_LE(rel_err(got.values[i], f32.values[i]), c.act_drift(act))
          << c.name() << " " << dtype_option_name(act) << " float output " << i;
    }
  }
}

// The CUDA half's comparison (used only when the CUDA backend is built in).
[[maybe_unused]] void expect_close(const OpCase& c, DType act, const Outputs& gpu,
                                   const Outputs& cpu) {
  ASSERT_EQ(gpu.values.size(), cpu.values.size());
  ASSERT_EQ(gpu.exact.size(), cpu.exact.size());
  for (size_t i = 0; i < cpu.values.size(); ++i) {
    EXPECT_LE(rel_err(gpu.values[i], cpu.values[i]), c.tolerance(act, i))
        << c.name() << " " << dtype_option_name(act) << " float output " << i;
  }
  for (size_t i = 0; i < cpu.exact.size(); ++i) {
    EXPECT_EQ(gpu.exact[i], cpu.exact[i])
        << c.name() << " " << dtype_option_name(act) << " exact output " << i;
  }
}

TEST_P(BackendOps, CudaMatchesCpu) {
#ifdef MOETRACE_BACKEND_CUDA
  if (!cuda::device_available()) {
    GTEST_SKIP() << "no CUDA device visible: the CUDA half of the backend test did not run";
  }
  const OpCase& c = *GetParam();
  cuda::Stream stream;
  for (DType act : kActs) {
    if (!c.gpu_runs(act)) continue;
    const Outputs gpu = c.cuda(act, stream.get());
    expect_close(c, act, gpu, c.cpu(act));
  }
#else
  GTEST_SKIP() << "built without CUDA: the CUDA half of the backend test did not run";
#endif
}

// "kernels/..." so that ctest -R kernels selects it.
INSTANTIATE_TEST_SUITE_P(kernels, BackendOps, ::testing::ValuesIn(all_cases()),
                         [](const auto& info) { return info.param->name(); });

}  // namespace
}  // namespace moetrace
