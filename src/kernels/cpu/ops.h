// CPU math used by the engine. No knowledge of models or files. Matrices are row-major float32.
// tests/kernels_cpu/ops_test.cc compares each op with a plain loop on odd sizes.
#pragma once

#include <cstdint>

namespace moetrace::cpu {

// C[M,N] = alpha * A[M,K] · B[N,K]ᵀ + beta * C  (B in PyTorch Linear layout [out, in]).
// lda/ldb/ldc are row strides in elements. Runs on BLAS; threads itself unless called inside an
// OpenMP parallel region (then single-threaded).
void gemm_nt(int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
             const float* B, int64_t ldb, float beta, float* C, int64_t ldc);
// C[M,N] = alpha * A[M,K] · B[K,N] + beta * C.
void gemm_nn(int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
             const float* B, int64_t ldb, float beta, float* C, int64_t ldc);

// out[r,:] = w * x[r,:] * rsqrt(mean(x[r,:]²) + eps); out may alias x.
void rmsnorm(const float* x, const float* w, int64_t rows, int64_t d, float eps, float* out);
// In-place softmax over each row of x[rows, n], max-subtracted. A row needs one finite entry: an
// all -inf row gives NaN, which is why masks add the lowest finite float (as transformers does).
void softmax_rows(float* x, int64_t rows, int64_t n);
void relu_inplace(float* x, int64_t n);

// Sets the BLAS/OpenMP thread count for this process (0 = leave the default).
void set_num_threads(int n);
int num_threads();

}  // namespace moetrace::cpu
