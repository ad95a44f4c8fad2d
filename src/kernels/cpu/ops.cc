// The dense CPU ops: GEMM (BLAS and a scalar twin), embedding rows, RMS norm, softmax, ReLU.
#include "kernels/cpu/ops.h"

#include <cblas.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "kernels/cpu/blas_info.h"

namespace moetrace::cpu {

void gemm_nt(int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
             const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(M), static_cast<int>(N),
              static_cast<int>(K), alpha, A, static_cast<int>(lda), B, static_cast<int>(ldb), beta,
              C, static_cast<int>(ldc));
}

void gemm_nn(int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
             const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, static_cast<int>(M), static_cast<int>(N),
              static_cast<int>(K), alpha, A, static_cast<int>(lda), B, static_cast<int>(ldb), beta,
              C, static_cast<int>(ldc));
}

void gemm_nt_scalar(int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
                    const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  for (int64_t i = 0; i < M; ++i) {
    for (int64_t j = 0; j < N; ++j) {
      double acc = 0;
      for (int64_t k = 0; k < K; ++k) acc += static_cast<double>(A[i * lda + k]) * B[j * ldb + k];
      float& c = C[i * ldc + j];
      c = alpha * static_cast<float>(acc) + (beta == 0.f ? 0.f : beta * c);
    }
  }
}

void embed(const int32_t* ids, const void* table, DType table_dt, int64_t T, int64_t d, float* x) {
  const size_t esize = dtype_size(table_dt);
#pragma omp parallel for schedule(static) if (T * d > 65536)
  for (int64_t t = 0; t < T; ++t) {
    const auto* row =
        static_cast<const std::byte*>(table) + static_cast<size_t>(ids[t] * d) * esize;
    convert_to_f32(table_dt, row, x + t * d, static_cast<size_t>(d));
  }
}

void rmsnorm(const float* x, const float* w, int64_t rows, int64_t d, float eps, float* out,
             DType act, float* out_f32) {
#pragma omp parallel for schedule(static) if (rows * d > 32768)
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * d;
    float* o = out + r * d;
    float* o32 = out_f32 != nullptr ? out_f32 + r * d : nullptr;
    float ss = 0.f;
    for (int64_t i = 0; i < d; ++i) ss += xr[i] * xr[i];
    const float scale = 1.0f / std::sqrt(ss / static_cast<float>(d) + eps);
    for (int64_t i = 0; i < d; ++i) {
      const float y = w[i] * (xr[i] * scale);
      if (o32 != nullptr) o32[i] = y;
      o[i] = round_to(y, act);
    }
  }
}

// One row of softmax_rows().
void softmax_row(float* x, int64_t n) {
  float mx = -std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < n; ++i) mx = std::max(mx, x[i]);
  float sum = 0.f;
  for (int64_t i = 0; i < n; ++i) {
    x[i] = std::exp(x[i] - mx);
    sum += x[i];
  }
  const float inv = 1.0f / sum;
  for (int64_t i = 0; i < n; ++i) x[i] *= inv;
}

void softmax_rows(float* x, int64_t rows, int64_t n) {
#pragma omp parallel for schedule(static) if (rows * n > 32768)
  for (int64_t r = 0; r < rows; ++r) softmax_row(x + r * n, n);
}

void relu_inplace(float* x, int64_t n, DType act) {
#pragma omp parallel for schedule(static) if (n > 65536)
  for (int64_t i = 0; i < n; ++i) x[i] = x[i] > 0.f ? x[i] : 0.f;
  round_inplace(x, n, act);
}

void round_inplace(float* x, int64_t n, DType act) {
  if (act == DType::kF32) return;
  for (int64_t i = 0; i < n; ++i) x[i] = round_to(x[i], act);
}

void set_num_threads(int n) {
  if (n <= 0) return;
  omp_set_num_threads(n);
  openblas_set_num_threads(n);
}

int num_threads() { return omp_get_max_threads(); }

std::string blas_config() {
  const char* c = openblas_get_config();
  std::string s = c != nullptr ? c : "unknown BLAS";
  while (!s.empty() && s.back() == ' ') s.pop_back();
  return s;
}

}  // namespace moetrace::cpu
