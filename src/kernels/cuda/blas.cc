#include "kernels/cuda/blas.h"

#include <cublasLt.h>
#include <cublas_v2.h>

#include <cstdint>
#include <utility>

#include "core/error.h"

namespace moetrace::cuda {
namespace {

constexpr size_t kWorkspaceBytes = 32u << 20;

cudaDataType_t cuda_type(DType t) {
  switch (t) {
    case DType::kF32:
      return CUDA_R_32F;
    case DType::kBF16:
      return CUDA_R_16BF;
    case DType::kF16:
      return CUDA_R_16F;
    default:
      fail("GEMM: unsupported dtype ", dtype_name(t));
  }
}

cublasComputeType_t compute_type(DType in) {
  // Pedantic float32 for float32 operands: no TF32, no reduced-precision reductions.
  return in == DType::kF32 ? CUBLAS_COMPUTE_32F_PEDANTIC : CUBLAS_COMPUTE_32F;
}

// cuBLASLt: plain float32 compute for float32 operands; it only uses TF32 when asked (FAST_TF32).
cublasComputeType_t lt_compute_type(DType) { return CUBLAS_COMPUTE_32F; }

// The largest power of two (<= 256, cuBLASLt's default assumption) that divides the address: a
// pointer into a buffer (a KV cache row, one layer's slice) may be less aligned than cudaMalloc's.
uint32_t alignment(const void* p) {
  const auto a = reinterpret_cast<uintptr_t>(p);
  uint32_t al = 256;
  while (al > 1 && a % al != 0) al /= 2;
  return al;
}

cublasHandle_t blas(void* h) { return static_cast<cublasHandle_t>(h); }
cublasLtHandle_t lt(void* h) { return static_cast<cublasLtHandle_t>(h); }

}  // namespace

struct Blas::Plan {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, d = nullptr;
  cublasLtMatmulAlgo_t algo{};
  ~Plan() {
    if (op) cublasLtMatmulDescDestroy(op);
    if (a) cublasLtMatrixLayoutDestroy(a);
    if (b) cublasLtMatrixLayoutDestroy(b);
    if (d) cublasLtMatrixLayoutDestroy(d);
  }
};

Blas::Blas(cudaStream_t stream) : stream_(stream), workspace_(kWorkspaceBytes) {
  cublasHandle_t h;
  MT_CUBLAS_CHECK(cublasCreate(&h));
  handle_ = h;
  MT_CUBLAS_CHECK(cublasSetStream(h, stream));
  MT_CUBLAS_CHECK(cublasSetMathMode(h, CUBLAS_DEFAULT_MATH));
  MT_CUBLAS_CHECK(cublasSetWorkspace(h, workspace_.get(), workspace_.bytes()));
  cublasLtHandle_t l;
  MT_CUBLAS_CHECK(cublasLtCreate(&l));
  lt_handle_ = l;
}

Blas::~Blas() {
  plans_.clear();
  if (lt_handle_) cublasLtDestroy(lt(lt_handle_));
  if (handle_) cublasDestroy(blas(handle_));
}

void Blas::set_stream(cudaStream_t stream) {
  stream_ = stream;
  MT_CUBLAS_CHECK(cublasSetStream(blas(handle_), stream));
}

// Row-major D[M,N] = A[M,K]·B[N,K]ᵀ is column-major Dᵀ[N,M] = op_T(B)·A: cuBLASLt sees m = N, n =
// M, its "A" is our B (k x N, transposed) and its "B" is our A (k x M).
Blas::Plan& Blas::plan_for(const GemmArgs& g) {
  const uint32_t align_a = alignment(g.A), align_b = alignment(g.B), align_d = alignment(g.D);
  const auto key = std::make_tuple(g.M, g.N, g.K, g.lda, g.ldb, g.ldd, static_cast<int>(g.in),
                                   static_cast<int>(g.out), static_cast<int>(g.accumulate),
                                   static_cast<int>(g.relu), align_a, align_b, align_d);
  auto it = plans_.find(key);
  if (it != plans_.end()) return *it->second;
  auto p = std::make_unique<Plan>();
  MT_CUBLAS_CHECK(cublasLtMatmulDescCreate(&p->op, lt_compute_type(g.in), CUDA_R_32F));
  const cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
  MT_CUBLAS_CHECK(
      cublasLtMatmulDescSetAttribute(p->op, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof(ta)));
  MT_CUBLAS_CHECK(
      cublasLtMatmulDescSetAttribute(p->op, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof(tb)));
  if (g.relu) {
    const cublasLtEpilogue_t epi = CUBLASLT_EPILOGUE_RELU;
    MT_CUBLAS_CHECK(
        cublasLtMatmulDescSetAttribute(p->op, CUBLASLT_MATMUL_DESC_EPILOGUE, &epi, sizeof(epi)));
  }
  MT_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&p->a, cuda_type(g.in), static_cast<uint64_t>(g.K),
                                             static_cast<uint64_t>(g.N), g.ldb));
  MT_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&p->b, cuda_type(g.in), static_cast<uint64_t>(g.K),
                                             static_cast<uint64_t>(g.M), g.lda));
  MT_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&p->d, cuda_type(g.out), static_cast<uint64_t>(g.N),
                                             static_cast<uint64_t>(g.M), g.ldd));
  cublasLtMatmulPreference_t pref;
  MT_CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&pref));
  const size_t ws = workspace_.bytes();
  MT_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(
      pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws)));
  // cuBLASLt's "A" is our B, its "B" our A; C and D are our D.
  for (auto [attr, al] : {std::pair{CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, align_b},
                          std::pair{CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, align_a},
                          std::pair{CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, align_d},
                          std::pair{CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, align_d}})
    MT_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, attr, &al, sizeof(al)));
  cublasLtMatmulHeuristicResult_t result{};
  int found = 0;
  const cublasStatus_t st = cublasLtMatmulAlgoGetHeuristic(lt(lt_handle_), p->op, p->a, p->b, p->d,
                                                           p->d, pref, 1, &result, &found);
  cublasLtMatmulPreferenceDestroy(pref);
  if (st != CUBLAS_STATUS_SUCCESS || found == 0)
    fail("cuBLASLt: no algorithm for GEMM M=", g.M, " N=", g.N, " K=", g.K,
         " in=", dtype_name(g.in), " out=", dtype_name(g.out), (g.relu ? " relu" : ""));
  p->algo = result.algo;
  return *plans_.emplace(key, std::move(p)).first->second;
}

void Blas::gemm_nt(const GemmArgs& g) {
  if (g.M == 0 || g.N == 0) return;
  MT_ASSERT(!(g.relu && g.accumulate));
  Plan& p = plan_for(g);
  const float alpha = 1.f, beta = g.accumulate ? 1.f : 0.f;
  MT_CUBLAS_CHECK(cublasLtMatmul(lt(lt_handle_), p.op, &alpha, g.B, p.a, g.A, p.b, &beta, g.D, p.d,
                                 g.D, p.d, &p.algo, workspace_.get(), workspace_.bytes(), stream_));
}

void Blas::batched_nt(int64_t count, int64_t M, int64_t N, int64_t K, const void* const* A,
                      int64_t lda, const void* const* B, int64_t ldb, void* const* C, int64_t ldc,
                      DType in, DType out) {
  if (count == 0) return;
  const float alpha = 1.f, beta = 0.f;
  MT_CUBLAS_CHECK(cublasGemmBatchedEx(
      blas(handle_), CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(N), static_cast<int>(M),
      static_cast<int>(K), &alpha, B, cuda_type(in), static_cast<int>(ldb), A, cuda_type(in),
      static_cast<int>(lda), &beta, C, cuda_type(out), static_cast<int>(ldc),
      static_cast<int>(count), compute_type(in), CUBLAS_GEMM_DEFAULT));
}

// Row-major C[M,N] = A[M,K]·B[K,N] is column-major Cᵀ[N,M] = Bᶜ[N,K]·Aᶜ[K,M], no transposes.
void Blas::batched_nn(int64_t count, int64_t M, int64_t N, int64_t K, const void* const* A,
                      int64_t lda, const void* const* B, int64_t ldb, void* const* C, int64_t ldc,
                      DType in, DType out) {
  if (count == 0) return;
  const float alpha = 1.f, beta = 0.f;
  MT_CUBLAS_CHECK(cublasGemmBatchedEx(
      blas(handle_), CUBLAS_OP_N, CUBLAS_OP_N, static_cast<int>(N), static_cast<int>(M),
      static_cast<int>(K), &alpha, B, cuda_type(in), static_cast<int>(ldb), A, cuda_type(in),
      static_cast<int>(lda), &beta, C, cuda_type(out), static_cast<int>(ldc),
      static_cast<int>(count), compute_type(in), CUBLAS_GEMM_DEFAULT));
}

}  // namespace moetrace::cuda
