// Every GPU kernel against its CPU twin (kernels/cuda/reference.h) on random inputs of odd sizes.
#include <memory>
#include <numeric>

#include "cuda_test_util.h"
#include "kernels/cuda/blas.h"
#include "kernels/cuda/ops.h"

namespace moetrace::cuda::test {
namespace {

constexpr DType kActs[] = {DType::kF32, DType::kBF16, DType::kF16};
double tol(DType t) { return t == DType::kF32 ? 2e-6 : t == DType::kBF16 ? 8e-3 : 1e-3; }

TEST(CudaReference, RelativeBucketMatchesSpecTable) {
  // SWITCH_SPEC.md, encoder with 32 buckets / max distance 128.
  const std::pair<int64_t, int64_t> cases[] = {
      {0, 0},   {7, 7},   {8, 8},   {11, 8},  {12, 9},  {15, 9},  {16, 10}, {22, 10}, {23, 11},
      {31, 11}, {32, 12}, {45, 12}, {46, 13}, {63, 13}, {64, 14}, {90, 14}, {91, 15}, {500, 15}};
  for (auto [a, want] : cases) {
    EXPECT_EQ(ref::relative_bucket(-a, true, 32, 128), want) << "rp=" << -a;
    if (a > 0) {
      EXPECT_EQ(ref::relative_bucket(a, true, 32, 128), want + 16) << "rp=" << a;
    }
  }
  EXPECT_EQ(ref::relative_bucket(3, false, 32, 128), 0);
  EXPECT_EQ(ref::relative_bucket(-5, false, 32, 128), 5);
}

class CudaKernels : public CudaTest {
 protected:
  void SetUp() override {
    CudaTest::SetUp();
    if (!IsSkipped()) stream_holder_ = std::make_unique<Stream>();
  }
  std::unique_ptr<Stream> stream_holder_;
  struct StreamRef {
    CudaKernels* self;
    cudaStream_t get() const { return self->stream_holder_->get(); }
  } stream_{this};
  void check_rmsnorm(int64_t rows, int64_t d, DType t);
};

TEST_F(CudaKernels, Embed) {
  const int64_t V = 53, d = 45, T = 37;
  for (DType t : kActs) {
    auto table = random_vec(V * d, 1);
    round_vec(table, t);
    std::vector<int32_t> ids(T);
    for (int64_t i = 0; i < T; ++i) ids[i] = static_cast<int32_t>((i * 17 + 3) % V);
    auto dtab = to_device(table, t);
    auto dids = to_device_raw(ids);
    DeviceBuffer dx(T * d * 4);
    embed(dids.as<int32_t>(), dtab.get(), t, T, d, dx.as<float>(), stream_.get());
    std::vector<float> want;
    ref::embed(ids, table, d, want);
    EXPECT_EQ(from_device(dx, T * d, DType::kF32), want) << dtype_name(t);
  }
}

TEST_F(CudaKernels, RmsNorm) {
  for (const int64_t d : {771, 772})
    for (DType t : kActs) check_rmsnorm(37, d, t);
}

void CudaKernels::check_rmsnorm(int64_t rows, int64_t d, DType t) {
  auto x = random_vec(rows * d, 2 + d, -3, 3);
  auto w = random_vec(d, 3, 0.5f, 1.5f);
  std::vector<float> want;
  ref::rmsnorm(x, w, rows, d, 1e-6f, want);
  auto dx = to_device(x, DType::kF32), dw = to_device(w, DType::kF32);
  DeviceBuffer out(rows * d * 4), out32(rows * d * 4);
  rmsnorm(dx.as<float>(), dw.as<float>(), rows, d, 1e-6f, out.get(), t, out32.as<float>(),
          stream_.get());
  EXPECT_LT(rel_err(from_device(out32, rows * d, DType::kF32), want), 1e-6)
      << dtype_name(t) << " d=" << d;
  EXPECT_LT(rel_err(from_device(out, rows * d, t), want), tol(t)) << dtype_name(t) << " d=" << d;
}

TEST_F(CudaKernels, AttentionSoftmaxBiasMaskCausal) {
  const int64_t B = 3, H = 5, S = 37;
  auto scores = random_vec(B * H * S * S, 4, -8, 8);
  auto bias = random_vec(H * (2 * S - 1), 5, -2, 2);
  std::vector<int32_t> mask(B * S, 1);
  for (int64_t s = 20; s < S; ++s) mask[1 * S + s] = 0;  // right padding in sequence 1
  for (int64_t s = 1; s < S; ++s) mask[2 * S + s] = 0;   // a length-1 sequence
  auto ds = to_device(scores, DType::kF32), db = to_device(bias, DType::kF32);
  auto dm = to_device_raw(mask);
  for (bool causal : {false, true})
    for (DType t : kActs) {
      DeviceBuffer dp(B * H * S * S * 4);
      attention_softmax(ds.as<float>(), db.as<float>(), dm.as<int32_t>(), causal, B, H, S, S,
                        dp.get(), t, stream_.get());
      std::vector<float> want;
      ref::attention_softmax(scores, bias.data(), mask.data(), causal, B, H, S, S, want);
      EXPECT_LT(rel_err(from_device(dp, want.size(), t), want), tol(t))
          << dtype_name(t) << " causal=" << causal;
    }
}

// Router logits with planted exact ties and one dominant expert, so capacity drops happen.
std::vector<float> router_logits(int64_t T, int64_t E, uint64_t seed) {
  auto l = random_vec(T * E, seed, -2, 2);
  for (int64_t t = 0; t < T; ++t) {
    if (t % 5 == 0) l[t * E + 3] += 3.f;                      // expert 3 overfills
    if (t % 7 == 0) l[t * E + 1] = l[t * E + (E - 2)] = 9.f;  // an exact tie: lowest index wins
  }
  return l;
}

TEST_F(CudaKernels, MoeRoute) {
  const int64_t B = 5, S = 77, E = 19, cap = 6;
  auto logits = router_logits(B * S, E, 6);
  auto dl = to_device(logits, DType::kF32);
  for (DType t : kActs) {
    DeviceBuffer dexp(B * S * 4), ddrop(B * S), dgate(B * S * 4), dcnt(E * 4), d16(B * S * E * 2);
    MT_CUDA_CHECK(cudaMemsetAsync(dcnt.get(), 0, E * 4, stream_.get()));
    moe_route(dl.as<float>(), B, S, E, cap, t, dexp.as<int32_t>(), ddrop.as<uint8_t>(),
              dgate.as<float>(), dcnt.as<int32_t>(), d16.as<uint16_t>(), stream_.get());
    std::vector<int32_t> e, c;
    std::vector<uint8_t> dr;
    std::vector<float> g;
    ref::moe_route(logits, B, S, E, cap, t, e, dr, g, c);
    EXPECT_EQ(from_device_raw<int32_t>(dexp, B * S), e) << dtype_name(t);
    EXPECT_EQ(from_device_raw<uint8_t>(ddrop, B * S), dr) << dtype_name(t);
    EXPECT_EQ(from_device_raw<int32_t>(dcnt, E), c) << dtype_name(t);
    EXPECT_LT(rel_err(from_device_raw<float>(dgate, B * S), g), 1e-6) << dtype_name(t);
    EXPECT_LT(rel_err(from_device(d16, B * S * E, DType::kF16), logits), 1e-3);
    EXPECT_GT(std::accumulate(dr.begin(), dr.end(), 0), 0) << "the test should exercise drops";
  }
}

// route -> plan -> permute -> grouped wi (ReLU) -> grouped wo (gate, un-permute, residual add).
TEST_F(CudaKernels, MoeExpertLayer) {
  const int64_t B = 5, S = 77, E = 19, cap = 9, K = 72, F = 200, T = B * S;
  auto logits = router_logits(T, E, 7);
  for (DType t : kActs) {
    auto h = random_vec(T * K, 8);
    auto wi = random_vec(E * F * K, 9, -0.2f, 0.2f);
    auto wo = random_vec(E * K * F, 10, -0.2f, 0.2f);
    round_vec(h, t);
    round_vec(wi, t);
    round_vec(wo, t);
    auto x0 = random_vec(T * K, 11);
    std::vector<int32_t> e, c;
    std::vector<uint8_t> dr;
    std::vector<float> g;
    ref::moe_route(logits, B, S, E, cap, t, e, dr, g, c);
    std::vector<float> want = x0;
    ref::moe_ffn(h, wi, wo, e, dr, g, T, K, F, t, want);

    const int tile_m = grouped_tile_m(t);
    const int64_t max_tiles = (T + tile_m - 1) / tile_m + E;
    auto dl = to_device(logits, DType::kF32), dh = to_device(h, t), dwi = to_device(wi, t),
         dwo = to_device(wo, t);
    auto dx = to_device(x0, DType::kF32);
    DeviceBuffer dexp(T * 4), ddrop(T), dgate(T * 4), dcnt(E * 4), doff((E + 1) * 4), dcur(E * 4),
        dperm(T * 4), dte(max_tiles * 4), dtr(max_tiles * 4), dinner(T * F * 4);
    cudaStream_t s = stream_.get();
    MT_CUDA_CHECK(cudaMemsetAsync(dcnt.get(), 0, E * 4, s));
    moe_route(dl.as<float>(), B, S, E, cap, t, dexp.as<int32_t>(), ddrop.as<uint8_t>(),
              dgate.as<float>(), dcnt.as<int32_t>(), nullptr, s);
    moe_plan(dcnt.as<int32_t>(), E, tile_m, max_tiles, doff.as<int32_t>(), dte.as<int32_t>(),
             dtr.as<int32_t>(), dcur.as<int32_t>(), s);
    moe_permute(dexp.as<int32_t>(), ddrop.as<uint8_t>(), T, doff.as<int32_t>(), dcur.as<int32_t>(),
                dperm.as<int32_t>(), s);
    grouped_gemm(dh.get(), K, true, dperm.as<int32_t>(), dwi.get(), F, K, dte.as<int32_t>(),
                 dtr.as<int32_t>(), doff.as<int32_t>(), max_tiles, GroupedEpilogue::kRelu,
                 dinner.get(), F, nullptr, t, s);
    grouped_gemm(dinner.get(), F, false, dperm.as<int32_t>(), dwo.get(), K, F, dte.as<int32_t>(),
                 dtr.as<int32_t>(), doff.as<int32_t>(), max_tiles, GroupedEpilogue::kGateResidual,
                 dx.get(), K, dgate.as<float>(), t, s);
    const auto got = from_device(dx, T * K, DType::kF32);
    std::vector<float> got_delta(T * K), want_delta(T * K);
    for (int64_t i = 0; i < T * K; ++i) {
      got_delta[i] = got[i] - x0[i];
      want_delta[i] = want[i] - x0[i];
    }
    EXPECT_LT(rel_err(got_delta, want_delta), t == DType::kF32 ? 1e-5 : 1e-2) << dtype_name(t);
    // Dropped tokens are carried by the residual only.
    for (int64_t i = 0; i < T; ++i)
      if (dr[i]) {
        EXPECT_EQ(got[i * K], x0[i * K]);
        break;
      }
  }
}

TEST_F(CudaKernels, GemmNtReluAccumulate) {
  const int64_t M = 37, N = 93, K = 72;
  Blas blas(stream_.get());
  for (DType t : kActs) {
    auto a = random_vec(M * K, 12), b = random_vec(N * K, 13), c0 = random_vec(M * N, 14);
    round_vec(a, t);
    round_vec(b, t);
    std::vector<float> prod(M * N);
    for (int64_t i = 0; i < M; ++i)
      for (int64_t j = 0; j < N; ++j) {
        double acc = 0;
        for (int64_t k = 0; k < K; ++k) acc += static_cast<double>(a[i * K + k]) * b[j * K + k];
        prod[i * N + j] = static_cast<float>(acc);
      }
    auto da = to_device(a, t), db = to_device(b, t);
    // relu into the activation dtype
    DeviceBuffer dr(M * N * 4);
    blas.gemm_nt({M, N, K, da.get(), K, db.get(), K, dr.get(), N, t, t, false, true});
    std::vector<float> want_relu(M * N);
    for (int64_t i = 0; i < M * N; ++i) want_relu[i] = std::max(prod[i], 0.f);
    EXPECT_LT(rel_err(from_device(dr, M * N, t), want_relu), tol(t)) << dtype_name(t);
    // accumulate into float32
    auto dc = to_device(c0, DType::kF32);
    blas.gemm_nt({M, N, K, da.get(), K, db.get(), K, dc.get(), N, t, DType::kF32, true, false});
    std::vector<float> want_acc(M * N);
    for (int64_t i = 0; i < M * N; ++i) want_acc[i] = c0[i] + prod[i];
    EXPECT_LT(rel_err(from_device(dc, M * N, DType::kF32), want_acc),
              t == DType::kF32 ? 1e-6 : 1e-5)
        << dtype_name(t);
  }
}

// The KV-cache writes of the decoder: D at a row offset of a wide strided buffer, B a slice of a
// stacked weight, both less aligned than cudaMalloc's 256 bytes.
TEST_F(CudaKernels, GemmNtIntoStridedSlice) {
  const int64_t M = 5, N = 48, K = 40, Wrows = 3 * N, ldd = 7 * N;
  Blas blas(stream_.get());
  for (DType t : kActs) {
    auto a = random_vec(M * K, 30), w = random_vec(Wrows * K, 31);
    round_vec(a, t);
    round_vec(w, t);
    const size_t as = act_size(t);
    auto da = to_device(a, t), dw = to_device(w, t);
    auto dd = to_device(std::vector<float>(M * ldd, 0.f), t);
    for (int64_t col0 : {int64_t{0}, int64_t{8}, N + 8, 3 * N}) {  // D columns [col0, col0 + N)
      const int64_t w0 = col0 == 0 ? 0 : 8;                        // weight rows [w0, w0 + N)
      blas.gemm_nt({M, N, K, da.get(), K, dw.as<uint8_t>() + w0 * K * as, K,
                    dd.as<uint8_t>() + col0 * as, ldd, t, t});
      const auto got = from_device(dd, M * ldd, t);
      double num = 0, den = 0;
      for (int64_t i = 0; i < M; ++i)
        for (int64_t j = 0; j < N; ++j) {
          double acc = 0;
          for (int64_t k = 0; k < K; ++k)
            acc += static_cast<double>(a[i * K + k]) * w[(w0 + j) * K + k];
          const double g = got[i * ldd + col0 + j];
          num += (g - acc) * (g - acc);
          den += acc * acc;
        }
      EXPECT_LT(std::sqrt(num / den), tol(t)) << dtype_name(t) << " D column offset " << col0;
    }
  }
}

// One attention core over packed qkv: scores, softmax with bias and mask, probs·v into ctx.
TEST_F(CudaKernels, AttentionBatchedGemms) {
  const int64_t B = 3, S = 29, H = 3, dk = 8;
  Blas blas(stream_.get());
  for (DType t : kActs) {
    auto qkv = random_vec(B * S * 3 * H * dk, 15);
    round_vec(qkv, t);
    auto bias = random_vec(H * (2 * S - 1), 16);
    std::vector<int32_t> mask(B * S, 1);
    for (int64_t s = 11; s < S; ++s) mask[S + s] = 0;
    auto dqkv = to_device(qkv, t), dbias = to_device(bias, DType::kF32);
    auto dmask = to_device_raw(mask);
    DeviceBuffer scores(B * H * S * S * 4), probs(B * H * S * S * 4), ctx(B * S * H * dk * 4),
        ptrs(6 * B * H * sizeof(void*));
    auto** tab = ptrs.as<void*>();
    const int64_t n = B * H;
    AttentionPointers p{const_cast<const void**>(tab),         const_cast<const void**>(tab + n),
                        const_cast<const void**>(tab + 2 * n), tab + 3 * n,
                        const_cast<const void**>(tab + 4 * n), tab + 5 * n};
    cudaStream_t s = stream_.get();
    attention_pointers(dqkv.get(), scores.as<float>(), probs.get(), ctx.get(), B, S, H, dk, t, p,
                       s);
    blas.batched_nt(n, S, S, dk, p.q, 3 * H * dk, p.k, 3 * H * dk, p.scores, S, t, DType::kF32);
    attention_softmax(scores.as<float>(), dbias.as<float>(), dmask.as<int32_t>(), false, B, H, S, S,
                      probs.get(), t, s);
    blas.batched_nn(n, S, dk, S, p.probs, S, p.v, 3 * H * dk, p.ctx, H * dk, t, t);

    std::vector<float> sc(B * H * S * S), pr, want(B * S * H * dk);
    const int64_t ld = 3 * H * dk;
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < H; ++h)
        for (int64_t i = 0; i < S; ++i)
          for (int64_t j = 0; j < S; ++j) {
            double acc = 0;
            for (int64_t c = 0; c < dk; ++c)
              acc += static_cast<double>(qkv[(b * S + i) * ld + h * dk + c]) *
                     qkv[(b * S + j) * ld + H * dk + h * dk + c];
            sc[((b * H + h) * S + i) * S + j] = static_cast<float>(acc);
          }
    ref::attention_softmax(sc, bias.data(), mask.data(), false, B, H, S, S, pr);
    round_vec(pr, t);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < H; ++h)
        for (int64_t i = 0; i < S; ++i)
          for (int64_t c = 0; c < dk; ++c) {
            double acc = 0;
            for (int64_t j = 0; j < S; ++j)
              acc += static_cast<double>(pr[((b * H + h) * S + i) * S + j]) *
                     qkv[(b * S + j) * ld + 2 * H * dk + h * dk + c];
            want[(b * S + i) * H * dk + h * dk + c] = static_cast<float>(acc);
          }
    EXPECT_LT(rel_err(from_device(ctx, want.size(), t), want), tol(t) * 2) << dtype_name(t);
  }
}

// The fused kernel (head size 64, bf16/fp16) against the same CPU math, odd S and padding.
TEST_F(CudaKernels, FlashAttention) {
  const int64_t B = 3, S = 77, H = 2, dk = 64, inner = H * dk, ld = 3 * inner;
  for (DType t : {DType::kBF16, DType::kF16}) {
    auto qkv = random_vec(B * S * ld, 17, -0.5f, 0.5f);
    round_vec(qkv, t);
    auto bias = random_vec(H * (2 * S - 1), 18, -1, 1);
    std::vector<int32_t> mask(B * S, 1);
    for (int64_t s = 30; s < S; ++s) mask[S + s] = 0;
    for (int64_t s = 1; s < S; ++s) mask[2 * S + s] = 0;
    auto dqkv = to_device(qkv, t), dbias = to_device(bias, DType::kF32);
    auto dmask = to_device_raw(mask);
    DeviceBuffer ctx(B * S * inner * 2);
    ASSERT_TRUE(flash_attention_supported(dk, S, t));
    flash_attention(dqkv.get(), dbias.as<float>(), dmask.as<int32_t>(), B, S, H, dk, ctx.get(), t,
                    stream_.get());
    std::vector<float> sc(B * H * S * S), pr, want(B * S * inner);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < H; ++h)
        for (int64_t i = 0; i < S; ++i)
          for (int64_t j = 0; j < S; ++j) {
            double acc = 0;
            for (int64_t c = 0; c < dk; ++c)
              acc += static_cast<double>(qkv[(b * S + i) * ld + h * dk + c]) *
                     qkv[(b * S + j) * ld + inner + h * dk + c];
            sc[((b * H + h) * S + i) * S + j] = static_cast<float>(acc);
          }
    ref::attention_softmax(sc, bias.data(), mask.data(), false, B, H, S, S, pr);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < H; ++h)
        for (int64_t i = 0; i < S; ++i)
          for (int64_t c = 0; c < dk; ++c) {
            double acc = 0;
            for (int64_t j = 0; j < S; ++j)
              acc += static_cast<double>(pr[((b * H + h) * S + i) * S + j]) *
                     qkv[(b * S + j) * ld + 2 * inner + h * dk + c];
            want[(b * S + i) * inner + h * dk + c] = static_cast<float>(acc);
          }
    EXPECT_LT(rel_err(from_device(ctx, want.size(), t), want), tol(t) * 2) << dtype_name(t);
  }
}

// decode_attention against its CPU twin: a generation step over a strided KV cache (causal,
// distance bias), a teacher-forced causal pass, and cross-attention (padding mask, non-causal),
// with odd head sizes and row strides.
struct DecodeAttnCase {
  const char* name;
  int64_t B, H, dk, Sq, Sk, cache_len;  // keys live in a [B, cache_len] cache; Sk of them are used
  bool causal, bias, mask;
};

TEST_F(CudaKernels, DecodeAttention) {
  const DecodeAttnCase cases[] = {
      {"step", 3, 3, 40, 1, 29, 37, true, true, false},
      {"step_first", 2, 2, 64, 1, 1, 5, true, true, false},
      {"teacher_forced", 3, 2, 8, 23, 23, 23, true, true, false},
      {"cross", 4, 3, 64, 5, 41, 41, false, false, true},
      {"cross_step", 5, 4, 24, 1, 67, 67, false, false, true},
  };
  for (const auto& k : cases)
    for (DType t : kActs) {
      const int64_t inner = k.H * k.dk, ldq = inner + 5, ldctx = inner + 3;
      const int64_t ldkv = 2 * inner + 16;  // k | v | other columns (another layer's)
      const int64_t kv_bstride = k.cache_len * ldkv;
      auto q = random_vec(k.B * k.Sq * ldq, 20, -0.5f, 0.5f);
      auto kv = random_vec(k.B * kv_bstride, 21, -0.5f, 0.5f);
      round_vec(q, t);
      round_vec(kv, t);
      auto bias = random_vec(k.H * k.cache_len, 22, -1, 1);
      std::vector<int32_t> mask(k.B * k.Sk, 1);
      for (int64_t b = 1; b < k.B; ++b)  // right padding, sequence b of length Sk - 7b (>= 1)
        for (int64_t j = std::max<int64_t>(1, k.Sk - 7 * b); j < k.Sk; ++j) mask[b * k.Sk + j] = 0;
      const float* bias_h = k.bias ? bias.data() : nullptr;
      const int32_t* mask_h = k.mask ? mask.data() : nullptr;
      std::vector<float> want;
      ref::decode_attention(q, ldq, kv.data(), kv.data() + inner, ldkv, kv_bstride, bias_h,
                            k.cache_len, mask_h, k.causal, k.B, k.H, k.Sq, k.Sk, k.dk, t, want,
                            ldctx);
      auto dq = to_device(q, t), dkv = to_device(kv, t), dbias = to_device(bias, DType::kF32);
      auto dmask = to_device_raw(mask);
      auto dctx = to_device(std::vector<float>(k.B * k.Sq * ldctx, 0.f), t);
      const size_t as = act_size(t);
      decode_attention(dq.get(), ldq, dkv.get(), dkv.as<uint8_t>() + inner * as, ldkv, kv_bstride,
                       k.bias ? dbias.as<float>() : nullptr, k.cache_len,
                       k.mask ? dmask.as<int32_t>() : nullptr, k.causal, k.B, k.H, k.Sq, k.Sk, k.dk,
                       dctx.get(), ldctx, t, stream_.get());
      const auto got = from_device(dctx, want.size(), t);
      EXPECT_LT(rel_err(got, want), tol(t) * 2) << k.name << " " << dtype_name(t);
      // The padding columns of ctx stay untouched.
      for (int64_t r = 0; r < k.B * k.Sq; ++r)
        for (int64_t c = inner; c < ldctx; ++c) ASSERT_EQ(got[r * ldctx + c], 0.f) << k.name;
    }
}

// First maximum (ties to the lowest index), the banned eos, finished sequences padded.
TEST_F(CudaKernels, GreedyPick) {
  const int64_t B = 7, V = 1037;
  const int32_t eos = 1, pad = 0;
  auto logits = random_vec(B * V, 23, -4, 4);
  logits[1 * V + 200] = logits[1 * V + 500] = 9.f;  // a tie: 200 wins
  logits[2 * V + eos] = 9.f;                        // eos is the best: finished (unless banned)
  logits[3 * V + 17] = 9.f;                         // finished before: pad whatever the logits
  logits[4 * V + V - 1] = 9.f;                      // the last column
  for (int64_t j = 0; j < V; ++j) logits[5 * V + j] = -INFINITY;  // all -inf: the first token
  for (int32_t banned : {-1, eos}) {
    std::vector<uint8_t> fin_want(B, 0);
    fin_want[3] = 1;
    auto dfin = to_device_raw(fin_want);
    auto dl = to_device(logits, DType::kF32);
    DeviceBuffer dids(B * 4);
    greedy_pick(dl.as<float>(), B, V, banned, eos, pad, dfin.as<uint8_t>(), dids.as<int32_t>(),
                stream_.get());
    std::vector<int32_t> ids_want;
    ref::greedy_pick(logits, B, V, banned, eos, pad, fin_want, ids_want);
    EXPECT_EQ(from_device_raw<int32_t>(dids, B), ids_want) << "banned " << banned;
    EXPECT_EQ(from_device_raw<uint8_t>(dfin, B), fin_want) << "banned " << banned;
    EXPECT_EQ(ids_want[1], 200);
    EXPECT_EQ(ids_want[3], pad);
    EXPECT_EQ(ids_want[2] == eos, banned < 0);
  }
}

}  // namespace
}  // namespace moetrace::cuda::test
