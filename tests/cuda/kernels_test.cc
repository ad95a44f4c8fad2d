// GPU kernel behaviour that the backend test (tests/backend, every op against its CPU twin in
// kernels/cpu) does not cover: the router's float16 capture copy and GEMMs into strided slices.
#include <memory>

#include "cuda_test_util.h"
#include "kernels/cuda/blas.h"
#include "kernels/cuda/ops.h"

namespace moetrace::cuda::test {
namespace {

constexpr DType kActs[] = {DType::kF32, DType::kBF16, DType::kF16};
double tol(DType t) { return t == DType::kF32 ? 2e-6 : t == DType::kBF16 ? 8e-3 : 1e-3; }

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
};

// moe_route writes the logits as float16 too when asked (the capture of fp16 logits).
TEST_F(CudaKernels, MoeRouteCapturesF16Logits) {
  const int64_t B = 5, S = 77, E = 19, cap = 6;
  auto logits = random_vec(B * S * E, 6, -2, 2);
  auto dl = to_device(logits, DType::kF32);
  for (DType t : kActs) {
    DeviceBuffer dexp(B * S * 4), ddrop(B * S), dgate(B * S * 4), dcnt(E * 4), d16(B * S * E * 2);
    MT_CUDA_CHECK(cudaMemsetAsync(dcnt.get(), 0, E * 4, stream_.get()));
    moe_route(dl.as<float>(), B, S, E, cap, t, dexp.as<int32_t>(), ddrop.as<uint8_t>(),
              dgate.as<float>(), dcnt.as<int32_t>(), d16.as<uint16_t>(), stream_.get());
    EXPECT_LT(rel_err(from_device(d16, B * S * E, DType::kF16), logits), 1e-3) << dtype_name(t);
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

}  // namespace
}  // namespace moetrace::cuda::test
