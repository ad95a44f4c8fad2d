// Dense GEMMs on the GPU through cuBLASLt (projections, dense FFN, router) and cuBLAS batched GEMMs
// (attention), in row-major terms. Operands are in the activation dtype (F32, BF16 or F16) unless
// stated; accumulation is always float32, and float32 operands never use TF32 (routing is
// tie-sensitive, and fp32 mode is the parity mode).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <map>
#include <memory>
#include <tuple>

#include "core/dtype.h"
#include "kernels/cuda/common.h"

namespace moetrace::cuda {

struct GemmArgs {
  int64_t M = 0, N = 0, K = 0;
  const void* A = nullptr;  // [M, K], row stride lda
  int64_t lda = 0;
  const void* B = nullptr;  // [N, K] (PyTorch Linear layout [out, in]), row stride ldb
  int64_t ldb = 0;
  void* D = nullptr;  // [M, N], row stride ldd
  int64_t ldd = 0;
  DType in = DType::kBF16;   // A and B
  DType out = DType::kBF16;  // D: the activation dtype or F32
  bool accumulate = false;   // D += A·Bᵀ (beta = 1) instead of D = A·Bᵀ
  bool relu = false;         // D = relu(A·Bᵀ) (not with accumulate)
};

class Blas {
 public:
  explicit Blas(cudaStream_t stream);
  ~Blas();
  Blas(const Blas&) = delete;
  Blas& operator=(const Blas&) = delete;

  void set_stream(cudaStream_t stream);
  // D[M,N] (+)= A[M,K] · B[N,K]ᵀ through cuBLASLt; the algorithm is cached per shape.
  void gemm_nt(const GemmArgs& g);

  // Batched over `count` pointer-table entries (device arrays), row-major:
  //   nt: C[i] (M x N, ldc) = A[i] (M x K, lda) · B[i] (N x K, ldb)ᵀ
  //   nn: C[i] (M x N, ldc) = A[i] (M x K, lda) · B[i] (K x N, ldb)
  // A and B in `in`, C in `out` (in or F32).
  void batched_nt(int64_t count, int64_t M, int64_t N, int64_t K, const void* const* A, int64_t lda,
                  const void* const* B, int64_t ldb, void* const* C, int64_t ldc, DType in,
                  DType out);
  void batched_nn(int64_t count, int64_t M, int64_t N, int64_t K, const void* const* A, int64_t lda,
                  const void* const* B, int64_t ldb, void* const* C, int64_t ldc, DType in,
                  DType out);

 private:
  struct Plan;
  Plan& plan_for(const GemmArgs& g);

  cudaStream_t stream_;
  void* handle_ = nullptr;     // cublasHandle_t
  void* lt_handle_ = nullptr;  // cublasLtHandle_t
  DeviceBuffer workspace_;
  // Per shape, strides, dtypes, epilogue and the pointers' alignments (A, B, D).
  std::map<std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int, int, int, int,
                      uint32_t, uint32_t, uint32_t>,
           std::unique_ptr<Plan>>
      plans_;
};

}  // namespace moetrace::cuda
