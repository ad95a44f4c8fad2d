// The CPU ops against plain loops on random inputs of odd sizes.
#include "kernels/cpu/ops.h"

#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

namespace moetrace {
namespace {

std::vector<float> random_vec(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.f, 1.f);
  std::vector<float> v(n);
  for (auto& x : v) x = dist(rng);
  return v;
}

TEST(CpuOps, GemmMatchesLoops) {
  for (auto [M, N, K] :
       {std::tuple<int64_t, int64_t, int64_t>{1, 1, 1}, {7, 13, 5}, {33, 17, 65}, {129, 3, 31}}) {
    const auto A = random_vec(static_cast<size_t>(M * K), 1),
               B = random_vec(static_cast<size_t>(N * K), 2),
               Bn = random_vec(static_cast<size_t>(K * N), 3),
               C0 = random_vec(static_cast<size_t>(M * N), 4);
    std::vector<float> nt = C0, nn = C0;
    cpu::gemm_nt(M, N, K, 0.5f, A.data(), K, B.data(), K, 2.0f, nt.data(), N);
    cpu::gemm_nn(M, N, K, 1.0f, A.data(), K, Bn.data(), N, 0.0f, nn.data(), N);
    for (int64_t i = 0; i < M; ++i) {
      for (int64_t j = 0; j < N; ++j) {
        double s_nt = 0, s_nn = 0;
        for (int64_t k = 0; k < K; ++k) {
          s_nt += static_cast<double>(A[i * K + k]) * B[j * K + k];
          s_nn += static_cast<double>(A[i * K + k]) * Bn[k * N + j];
        }
        EXPECT_NEAR(nt[i * N + j], 0.5 * s_nt + 2.0 * C0[i * N + j], 1e-4 * (1 + std::abs(s_nt)))
            << M << N << K;
        EXPECT_NEAR(nn[i * N + j], s_nn, 1e-4 * (1 + std::abs(s_nn)));
      }
    }
  }
}

TEST(CpuOps, RmsNormSoftmaxReluMatchLoops) {
  const int64_t rows = 37, d = 19;
  const auto x = random_vec(static_cast<size_t>(rows * d), 5),
             w = random_vec(static_cast<size_t>(d), 6);
  std::vector<float> out(x.size());
  cpu::rmsnorm(x.data(), w.data(), rows, d, 1e-6f, out.data());
  std::vector<float> sm = x;
  cpu::softmax_rows(sm.data(), rows, d);
  std::vector<float> r = x;
  cpu::relu_inplace(r.data(), rows * d);
  for (int64_t i = 0; i < rows; ++i) {
    double ss = 0, mx = -1e30, z = 0;
    for (int64_t j = 0; j < d; ++j) {
      ss += static_cast<double>(x[i * d + j]) * x[i * d + j];
      mx = std::max(mx, static_cast<double>(x[i * d + j]));
    }
    for (int64_t j = 0; j < d; ++j) z += std::exp(x[i * d + j] - mx);
    const double inv = 1.0 / std::sqrt(ss / d + 1e-6);
    for (int64_t j = 0; j < d; ++j) {
      EXPECT_NEAR(out[i * d + j], w[j] * x[i * d + j] * inv, 1e-5);
      EXPECT_NEAR(sm[i * d + j], std::exp(x[i * d + j] - mx) / z, 1e-6);
      EXPECT_EQ(r[i * d + j], x[i * d + j] > 0 ? x[i * d + j] : 0.f);
    }
  }
}

TEST(CpuOps, SoftmaxOfMaskedRowStaysFinite) {
  std::vector<float> row = {-3.4e38f, -3.4e38f, 1.0f, -3.4e38f};
  cpu::softmax_rows(row.data(), 1, 4);
  EXPECT_FLOAT_EQ(row[2], 1.0f);
  EXPECT_EQ(row[0], 0.0f);
}

}  // namespace
}  // namespace moetrace
