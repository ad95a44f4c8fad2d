// Libraries against the hand kernels (docs/GPU.md, "Libraries against the hand kernels"), bf16
// operands, fp32 accumulation, on the switch-base shapes:
//   moe        moetrace's grouped expert GEMM (moe_plan / moe_permute tile tables, mma.sync)
//              against cublasGemmGroupedBatchedEx (one group per expert) and a per-expert loop of
//              cuBLASLt GEMMs: wi [T,768] -> [T,3072] (relu) and wo [T,3072] -> [T,768] (gate,
//              residual), T = 32768 tokens (128x256), 128 and 8 experts, skewed and uniform loads;
//   attention  moetrace's flash_attention (T5: unscaled, position bias [H, 2S-1], padding mask) at
//              B=128, H=12, S=256, d_kv=64 (bench/attention_libs.py times PyTorch's SDPA backends,
//              cuDNN's among them, on the same shape);
//   dense      the engine's cuBLASLt GEMM (kernels/cuda/blas.cc: the first heuristic) against the
//              best of the top-N heuristic algorithms, each timed, on the projection shapes.
// Every output is poisoned (NaN) before its checked run; implementations are compared with each
// other over the whole output and with an fp64 host reference on sampled rows. Prints one table;
// --json writes it with the date, the GPU and the CUDA / cuBLAS versions.
#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_bf16.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <vector>

#include "bench_util.h"
#include "core/error.h"
#include "kernels/cuda/blas.h"
#include "kernels/cuda/common.h"
#include "kernels/cuda/ops.h"

namespace moetrace {
namespace {

using cuda::DeviceBuffer;
using nlohmann::json;

constexpr double kTol = 2e-2;  // max |a - b| / max |b|: bf16 outputs round at 2^-8 relative
constexpr size_t kWorkspace = 32u << 20;  // cuBLAS / cuBLASLt workspace, as kernels/cuda/blas.cc

struct Args {
  std::string json;
  std::string parts = "moe,attention,dense";
  int reps = 50;
  int search = 32;  // cuBLASLt algorithms asked of the heuristic and timed (dense)
  int64_t tokens = 32768;
};

Args parse(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    const std::string k = argv[i];
    auto val = [&]() -> std::string {
      if (i + 1 >= argc) fail(k, " needs a value");
      return argv[++i];
    };
    if (k == "--json")
      a.json = val();
    else if (k == "--parts")
      a.parts = val();
    else if (k == "--reps")
      a.reps = std::stoi(val());
    else if (k == "--search")
      a.search = std::stoi(val());
    else if (k == "--tokens")
      a.tokens = std::stoll(val());
    else
      fail("unknown option '", k,
           "' (expected --json FILE, --parts moe,attention,dense, --reps N, --search N, --tokens "
           "T)");
  }
  if (a.reps < 1 || a.search < 1) fail("--reps and --search must be >= 1");
  if (a.tokens < 256 || a.tokens % 256 != 0)
    fail("--tokens ", a.tokens, ": expected a positive multiple of 256");
  return a;
}

bool has_part(const Args& a, const std::string& p) {
  return ("," + a.parts + ",").find("," + p + ",") != std::string::npos;
}

void check_lib(cublasStatus_t st, const char* what) {
  if (st != CUBLAS_STATUS_SUCCESS) fail(what, ": ", cublasGetStatusString(st));
}

// ---- Inputs: element i of a tensor is a hash of (seed, i), so the host rebuilds any of them ------

__host__ __device__ inline uint64_t mix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}
// Uniform in [lo, hi).
__host__ __device__ inline float uniform(uint64_t seed, uint64_t i, float lo, float hi) {
  const float u = static_cast<float>(mix64(mix64(seed) ^ i) >> 40) * (1.f / 16777216.f);
  return lo + (hi - lo) * u;
}
// bf16 bits of a finite float, round to nearest even.
__host__ __device__ inline uint16_t bf16_bits(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  u += 0x7FFFu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}
inline float bf16_value(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
// The value the device holds at element i of a tensor filled by fill_bf16(seed, scale).
inline double input_bf16(uint64_t seed, uint64_t i, float scale) {
  return bf16_value(bf16_bits(uniform(seed, i, -scale, scale)));
}

__global__ void fill_bf16_kernel(uint16_t* p, int64_t n, uint64_t seed, float scale) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x)
    p[i] = bf16_bits(uniform(seed, static_cast<uint64_t>(i), -scale, scale));
}
__global__ void fill_f32_kernel(float* p, int64_t n, uint64_t seed, float lo, float hi) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x)
    p[i] = uniform(seed, static_cast<uint64_t>(i), lo, hi);
}

// hp[r,:] = h[perm[r],:]: the gather a library needs before wi (the hand kernel gathers in its
// loads). Rows of `vecs` 16-byte vectors.
__global__ void gather_rows_kernel(const uint4* h, const int32_t* perm, int64_t rows, int64_t vecs,
                                   uint4* hp) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < rows * vecs;
       i += int64_t{gridDim.x} * blockDim.x)
    hp[i] = h[perm[i / vecs] * vecs + i % vecs];
}

__device__ inline float to_f(float v) { return v; }
__device__ inline float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }

// x[perm[r],:] += gate[perm[r]] * y[r,:]: the un-permute, gate and residual add a library needs
// after wo (fused into the hand kernel's epilogue).
template <class T>
__global__ void scatter_add_kernel(const T* y, const int32_t* perm, const float* gate, int64_t rows,
                                   int64_t d, float* x) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < rows * d;
       i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t tok = perm[i / d];
    x[tok * d + i % d] += gate[tok] * to_f(y[i]);
  }
}

// res[0] = max |a - f(b)|, res[1] = max |f(b)| (non-negative floats order like their bits),
// res[2] = non-finite values in a or b; f = relu when relu_b.
template <class A, class B>
__global__ void diff_kernel(const A* a, const B* b, int64_t n, bool relu_b, unsigned* res) {
  float d = 0.f, m = 0.f;
  unsigned bad = 0;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    const float x = to_f(a[i]);
    float y = to_f(b[i]);
    if (relu_b) y = fmaxf(y, 0.f);
    if (!isfinite(x) || !isfinite(y)) {
      ++bad;
      continue;
    }
    d = fmaxf(d, fabsf(x - y));
    m = fmaxf(m, fabsf(y));
  }
  atomicMax(res, __float_as_uint(d));
  atomicMax(res + 1, __float_as_uint(m));
  if (bad) atomicAdd(res + 2, bad);
}

dim3 grid_for(int64_t n) {
  return dim3(static_cast<unsigned>(std::min<int64_t>((n + 255) / 256, 132 * 16)));
}

void fill_bf16(void* p, int64_t n, uint64_t seed, float scale, cudaStream_t s) {
  fill_bf16_kernel<<<grid_for(n), 256, 0, s>>>(static_cast<uint16_t*>(p), n, seed, scale);
  MT_CUDA_CHECK_LAUNCH();
}
void fill_f32(void* p, int64_t n, uint64_t seed, float lo, float hi, cudaStream_t s) {
  fill_f32_kernel<<<grid_for(n), 256, 0, s>>>(static_cast<float*>(p), n, seed, lo, hi);
  MT_CUDA_CHECK_LAUNCH();
}
// NaN in every bf16 and fp32 element: a value nobody wrote fails the comparison.
void poison(const DeviceBuffer& b, cudaStream_t s) {
  MT_CUDA_CHECK(cudaMemsetAsync(b.get(), 0xFF, b.bytes(), s));
}

struct Diff {
  double max_abs = 0, max_ref = 0;
  int64_t nonfinite = 0;
  double rel() const { return nonfinite ? NAN : max_abs / std::max(max_ref, 1e-30); }
  bool ok() const { return nonfinite == 0 && max_ref > 0 && rel() <= kTol; }
};

template <class A, class B>
Diff device_diff(const A* a, const B* b, int64_t n, bool relu_b, cudaStream_t s) {
  static DeviceBuffer* res = new DeviceBuffer(16);  // kept to the end of the process
  MT_CUDA_CHECK(cudaMemsetAsync(res->get(), 0, 12, s));
  diff_kernel<<<grid_for(n), 256, 0, s>>>(a, b, n, relu_b, res->as<unsigned>());
  MT_CUDA_CHECK_LAUNCH();
  unsigned h[3];
  cuda::download(h, res->get(), sizeof h, s);
  float d, m;
  std::memcpy(&d, &h[0], 4);
  std::memcpy(&m, &h[1], 4);
  return Diff{d, m, h[2]};
}

// Mean milliseconds of one call of f over `reps` calls after 2 warm-up calls (events on s).
template <class F>
double time_ms(cudaStream_t s, int reps, F&& f) {
  for (int i = 0; i < 2; ++i) f();
  cuda::Event t0(true), t1(true);
  t0.record(s);
  for (int i = 0; i < reps; ++i) f();
  t1.record(s);
  t1.sync();
  float ms = 0;
  MT_CUDA_CHECK(cudaEventElapsedTime(&ms, t0.get(), t1.get()));
  return ms / reps;
}

double tflops(double flop, double ms) { return ms > 0 ? flop / (ms * 1e-3) / 1e12 : 0; }

// ---- cuBLASLt: row-major D[M,N] = A[M,K]·W[N,K]ᵀ laid out as kernels/cuda/blas.cc does -----------

struct LtPlan {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, d = nullptr;
  std::vector<cublasLtMatmulHeuristicResult_t> algos;  // best first, as the heuristic ranks them
  LtPlan() = default;
  LtPlan(const LtPlan&) = delete;
  LtPlan& operator=(const LtPlan&) = delete;
  ~LtPlan() {
    if (op) cublasLtMatmulDescDestroy(op);
    if (a) cublasLtMatrixLayoutDestroy(a);
    if (b) cublasLtMatrixLayoutDestroy(b);
    if (d) cublasLtMatrixLayoutDestroy(d);
  }
};

std::unique_ptr<LtPlan> lt_plan(cublasLtHandle_t lt, int64_t M, int64_t N, int64_t K,
                                cudaDataType_t out, bool relu, int n_algos) {
  auto p = std::make_unique<LtPlan>();
  MT_CUBLAS_CHECK(cublasLtMatmulDescCreate(&p->op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  const cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
  MT_CUBLAS_CHECK(
      cublasLtMatmulDescSetAttribute(p->op, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof ta));
  MT_CUBLAS_CHECK(
      cublasLtMatmulDescSetAttribute(p->op, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof tb));
  if (relu) {
    const cublasLtEpilogue_t epi = CUBLASLT_EPILOGUE_RELU;
    MT_CUBLAS_CHECK(
        cublasLtMatmulDescSetAttribute(p->op, CUBLASLT_MATMUL_DESC_EPILOGUE, &epi, sizeof epi));
  }
  // Column-major: Dᵀ[N,M] = op_T(W)·Aᵀ; cuBLASLt's "A" is W (K x N), its "B" is A (K x M).
  const auto u = [](int64_t v) { return static_cast<uint64_t>(v); };
  MT_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&p->a, CUDA_R_16BF, u(K), u(N), K));
  MT_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&p->b, CUDA_R_16BF, u(K), u(M), K));
  MT_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&p->d, out, u(N), u(M), N));
  cublasLtMatmulPreference_t pref;
  MT_CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&pref));
  const size_t ws = kWorkspace;
  MT_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(
      pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof ws));
  p->algos.resize(static_cast<size_t>(n_algos));
  int found = 0;
  const cublasStatus_t st = cublasLtMatmulAlgoGetHeuristic(lt, p->op, p->a, p->b, p->d, p->d, pref,
                                                           n_algos, p->algos.data(), &found);
  cublasLtMatmulPreferenceDestroy(pref);
  check_lib(st, "cublasLtMatmulAlgoGetHeuristic");
  if (found == 0) fail("cuBLASLt: no algorithm for M=", M, " N=", N, " K=", K);
  p->algos.resize(static_cast<size_t>(found));
  return p;
}

cublasStatus_t lt_run(cublasLtHandle_t lt, const LtPlan& p, size_t algo, const void* A,
                      const void* W, void* D, float beta, void* ws, cudaStream_t s) {
  const float alpha = 1.f;
  return cublasLtMatmul(lt, p.op, &alpha, W, p.a, A, p.b, &beta, D, p.d, D, p.d,
                        &p.algos[algo].algo, ws, kWorkspace, s);
}

struct Libs {
  cudaStream_t s;
  cublasHandle_t blas;
  cublasLtHandle_t lt;
  DeviceBuffer ws{kWorkspace};
  DeviceBuffer lt_ws{kWorkspace};
};

// ---- Grouped expert GEMM ------------------------------------------------------------------------

// Expert of every token: uniform, or skewed: expert e drawn with weight exp(0.7·z_e), z_e ~ N(0,1)
// (a lognormal load; the table prints the busiest expert's count over the mean and the smallest).
std::vector<int32_t> expert_ids(int64_t T, int64_t E, bool skewed, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<double> w(static_cast<size_t>(E), 1.0);
  if (skewed) {
    std::normal_distribution<double> z(0.0, 1.0);
    for (double& x : w) x = std::exp(0.7 * z(rng));
  }
  std::discrete_distribution<int32_t> pick(w.begin(), w.end());
  std::vector<int32_t> ids(static_cast<size_t>(T));
  for (int32_t& e : ids) e = pick(rng);
  return ids;
}

// One group per non-empty expert, m = N, n = rows of the expert, k = K (column-major view of
// out_e[rows, N] = A_e[rows, K]·W_eᵀ). Pointer tables on the device.
struct Grouped {
  std::vector<cublasOperation_t> ta, tb;
  std::vector<int> m, n, k, lda, ldb, ldc, size;
  std::vector<float> alpha, beta;
  std::vector<const void*> host_ptrs;  // [3][groups]: W_e, A_e, C_e
  DeviceBuffer ptrs;
  int groups = 0;
};

Grouped grouped_problem(const std::vector<int32_t>& counts, const std::vector<int32_t>& offsets,
                        const void* A, const void* W, void* C, int64_t N, int64_t K,
                        size_t c_size) {
  Grouped g;
  std::vector<const void*> w, a, c;
  for (size_t e = 0; e < counts.size(); ++e) {
    if (counts[e] == 0) continue;
    w.push_back(static_cast<const char*>(W) + e * N * K * 2);
    a.push_back(static_cast<const char*>(A) + offsets[e] * K * 2);
    c.push_back(static_cast<char*>(C) + offsets[e] * N * c_size);
    g.n.push_back(counts[e]);
  }
  g.groups = static_cast<int>(w.size());
  const auto G = static_cast<size_t>(g.groups);
  g.ta.assign(G, CUBLAS_OP_T);
  g.tb.assign(G, CUBLAS_OP_N);
  g.m.assign(G, static_cast<int>(N));
  g.k.assign(G, static_cast<int>(K));
  g.lda.assign(G, static_cast<int>(K));
  g.ldb.assign(G, static_cast<int>(K));
  g.ldc.assign(G, static_cast<int>(N));
  g.size.assign(G, 1);
  g.alpha.assign(G, 1.f);
  g.beta.assign(G, 0.f);
  g.host_ptrs = w;
  g.host_ptrs.insert(g.host_ptrs.end(), a.begin(), a.end());
  g.host_ptrs.insert(g.host_ptrs.end(), c.begin(), c.end());
  g.ptrs = DeviceBuffer(g.host_ptrs.size() * sizeof(void*));
  cuda::upload(g.ptrs.get(), g.host_ptrs.data(), g.ptrs.bytes());
  return g;
}

cublasStatus_t grouped_run(cublasHandle_t h, const Grouped& g, cudaDataType_t ctype) {
  const auto** p = g.ptrs.as<const void*>();
  return cublasGemmGroupedBatchedEx(h, g.ta.data(), g.tb.data(), g.m.data(), g.n.data(), g.k.data(),
                                    g.alpha.data(), p, CUDA_R_16BF, g.lda.data(), p + g.groups,
                                    CUDA_R_16BF, g.ldb.data(), g.beta.data(),
                                    const_cast<void* const*>(p + 2 * g.groups), ctype, g.ldc.data(),
                                    g.groups, g.size.data(), CUBLAS_COMPUTE_32F);
}

struct MoeCase {
  std::string model;
  int64_t E;
  bool skewed;
};

json moe_row(const MoeCase& c, const char* gemm, const char* impl, double flop) {
  return json{{"model", c.model},
              {"experts", c.E},
              {"load", c.skewed ? "skewed" : "uniform"},
              {"gemm", gemm},
              {"impl", impl},
              {"flop", flop},
              {"ms", nullptr},
              {"tflops", nullptr},
              {"pass_ms", 0.0},
              {"total_ms", nullptr},
              {"max_rel_diff", nullptr},
              {"ok", false},
              {"note", ""}};
}

void set_time(json& r, double ms, double pass_ms) {
  r["ms"] = ms;
  r["tflops"] = tflops(r["flop"].get<double>(), ms);
  r["pass_ms"] = pass_ms;
  r["total_ms"] = ms + pass_ms;
}

void set_diff(json& r, const Diff& d) {
  r["max_rel_diff"] = std::isnan(d.rel()) ? json(nullptr) : json(d.rel());
  r["ok"] = d.ok();
  if (d.nonfinite)
    r["note"] = r["note"].get<std::string>() + std::to_string(d.nonfinite) + " non-finite; ";
}

// fp64 reference of sampled permuted rows against the downloaded output: max |out - ref| / max |ref|.
// out_of(r, n) reads the implementation's value of row r (permuted order), column n.
template <class Out>
Diff sampled_reference(int64_t rows, int64_t N, int64_t K, const std::vector<int32_t>& row_expert,
                       const std::vector<int32_t>& perm, uint64_t a_seed, bool a_gathered,
                       uint64_t w_seed, bool relu, const std::vector<float>& gate, Out out_of) {
  Diff d;
  std::mt19937_64 rng(7);
  std::vector<double> a(static_cast<size_t>(K));
  for (int i = 0; i < 12; ++i) {
    const int64_t r = static_cast<int64_t>(rng() % static_cast<uint64_t>(rows));
    const int64_t arow = a_gathered ? perm[r] : r;
    const int64_t e = row_expert[r];
    for (int64_t k = 0; k < K; ++k) a[k] = input_bf16(a_seed, arow * K + k, 1.f);
    for (int64_t n = 0; n < N; n += 7) {
      double acc = 0;
      for (int64_t k = 0; k < K; ++k) acc += a[k] * input_bf16(w_seed, (e * N + n) * K + k, 1.f);
      if (relu) acc = std::max(acc, 0.0);
      if (!gate.empty()) acc *= gate[perm[r]];
      const double v = out_of(r, n);
      if (!std::isfinite(v)) {
        ++d.nonfinite;
        continue;
      }
      d.max_abs = std::max(d.max_abs, std::abs(v - acc));
      d.max_ref = std::max(d.max_ref, std::abs(acc));
    }
  }
  return d;
}

std::vector<float> download_f32(const void* p, int64_t n, cudaStream_t s) {
  std::vector<float> h(static_cast<size_t>(n));
  cuda::download(h.data(), p, h.size() * 4, s);
  return h;
}
std::vector<uint16_t> download_u16(const void* p, int64_t n, cudaStream_t s) {
  std::vector<uint16_t> h(static_cast<size_t>(n));
  cuda::download(h.data(), p, h.size() * 2, s);
  return h;
}

// Both GEMMs of one MoE layer for one expert count and load; appends rows; returns the load
// summary.
json run_moe(Libs& L, const MoeCase& c, int64_t T, int reps, json& rows, json& sync) {
  const int64_t d = 768, F = 3072, E = c.E;
  cudaStream_t s = L.s;
  const uint64_t seed_h = 11, seed_wi = 12, seed_wo = 13, seed_a2 = 14, seed_gate = 15;

  // Routing as the engine sees it after moe_route: expert ids, no drops, counts on the device.
  const std::vector<int32_t> expert = expert_ids(T, E, c.skewed, 1000 + static_cast<uint64_t>(E));
  std::vector<int32_t> counts(static_cast<size_t>(E), 0), offsets(static_cast<size_t>(E) + 1, 0);
  for (int32_t e : expert) ++counts[static_cast<size_t>(e)];
  for (int64_t e = 0; e < E; ++e) offsets[e + 1] = offsets[e] + counts[e];
  const int tile_m = cuda::grouped_tile_m(DType::kBF16);
  const int64_t max_tiles = T / tile_m + 1 + E;  // as CudaSwitchModel::Impl::feed_forward
  DeviceBuffer d_expert(T * 4), d_dropped(T), d_counts(E * 4), d_offsets((E + 1) * 4),
      d_tile_expert(max_tiles * 4), d_tile_row(max_tiles * 4), d_cursor(E * 4), d_perm(T * 4);
  cuda::upload(d_expert.get(), expert.data(), T * 4, s);
  MT_CUDA_CHECK(cudaMemsetAsync(d_dropped.get(), 0, T, s));
  cuda::upload(d_counts.get(), counts.data(), E * 4, s);
  cuda::moe_plan(d_counts.as<int32_t>(), E, tile_m, max_tiles, d_offsets.as<int32_t>(),
                 d_tile_expert.as<int32_t>(), d_tile_row.as<int32_t>(), d_cursor.as<int32_t>(), s);
  cuda::moe_permute(d_expert.as<int32_t>(), d_dropped.as<uint8_t>(), T, d_offsets.as<int32_t>(),
                    d_cursor.as<int32_t>(), d_perm.as<int32_t>(), s);
  std::vector<int32_t> perm(static_cast<size_t>(T)), dev_offsets(offsets.size());
  cuda::download(perm.data(), d_perm.get(), T * 4, s);
  cuda::download(dev_offsets.data(), d_offsets.get(), dev_offsets.size() * 4, s);
  if (dev_offsets != offsets) fail("moe_plan's offsets differ from the host's");
  std::vector<int32_t> row_expert(static_cast<size_t>(T));
  for (int64_t e = 0; e < E; ++e)
    for (int32_t r = offsets[e]; r < offsets[e + 1]; ++r) row_expert[r] = static_cast<int32_t>(e);

  DeviceBuffer h(T * d * 2), hp(T * d * 2), wi(E * F * d * 2), wo(E * d * F * 2), a2(T * F * 2),
      gate(T * 4), out_hand(T * F * 2), out_hand_pre(T * F * 2), out_grp(T * F * 2),
      out_lt(T * F * 2), x_hand(T * d * 4), y_grp(T * d * 4), y_lt(T * d * 4);
  fill_bf16(h.get(), T * d, seed_h, 1.f, s);
  fill_bf16(wi.get(), E * F * d, seed_wi, 1.f, s);
  fill_bf16(wo.get(), E * d * F, seed_wo, 1.f, s);
  fill_bf16(a2.get(), T * F, seed_a2, 1.f, s);  // wo's input, rows already in expert order
  fill_f32(gate.get(), T, seed_gate, 0.25f, 1.f, s);
  const std::vector<float> h_gate = download_f32(gate.get(), T, s);

  const double max_over_mean =
      *std::max_element(counts.begin(), counts.end()) * static_cast<double>(E) / T;
  const int32_t min_count = *std::min_element(counts.begin(), counts.end());
  const json load = {{"model", c.model},
                     {"experts", E},
                     {"load", c.skewed ? "skewed" : "uniform"},
                     {"tokens", T},
                     {"max_over_mean", max_over_mean},
                     {"min_count", min_count}};

  auto gather = [&] {
    gather_rows_kernel<<<grid_for(T * d / 8), 256, 0, s>>>(h.as<uint4>(), d_perm.as<int32_t>(), T,
                                                           d / 8, hp.as<uint4>());
    MT_CUDA_CHECK_LAUNCH();
  };
  gather();
  // Per-expert cuBLASLt plans (one heuristic query per distinct row count, outside the timing).
  std::map<std::pair<int32_t, int>, std::unique_ptr<LtPlan>> plans;
  auto plan = [&](int32_t rows_e, int64_t N, int64_t K, bool wi_gemm) -> LtPlan& {
    auto& p = plans[{rows_e, wi_gemm ? 1 : 0}];
    if (!p) p = lt_plan(L.lt, rows_e, N, K, wi_gemm ? CUDA_R_16BF : CUDA_R_32F, wi_gemm, 1);
    return *p;
  };
  auto lt_loop = [&](bool wi_gemm) {
    const int64_t N = wi_gemm ? F : d, K = wi_gemm ? d : F;
    for (int64_t e = 0; e < E; ++e) {
      if (counts[e] == 0) continue;
      const char* A = static_cast<const char*>(wi_gemm ? hp.get() : a2.get()) + offsets[e] * K * 2;
      const char* W = static_cast<const char*>(wi_gemm ? wi.get() : wo.get()) + e * N * K * 2;
      char* D = static_cast<char*>(wi_gemm ? out_lt.get() : y_lt.get()) +
                offsets[e] * N * (wi_gemm ? 2 : 4);
      check_lib(lt_run(L.lt, plan(counts[e], N, K, wi_gemm), 0, A, W, D, 0.f, L.lt_ws.get(), s),
                "cublasLtMatmul");
    }
  };
  const auto bf16_at = [](const std::vector<uint16_t>& v, int64_t N) {
    return [&v, N](int64_t r, int64_t n) -> double { return bf16_value(v[r * N + n]); };
  };

  // ---- wi: [T, d] -> [T, F], relu ----
  const double flop_wi = 2.0 * T * F * d;
  {
    auto hand = [&](bool gathered) {
      cuda::grouped_gemm(gathered ? h.get() : hp.get(), d, gathered, d_perm.as<int32_t>(), wi.get(),
                         F, d, d_tile_expert.as<int32_t>(), d_tile_row.as<int32_t>(),
                         d_offsets.as<int32_t>(), max_tiles, cuda::GroupedEpilogue::kRelu,
                         gathered ? out_hand.get() : out_hand_pre.get(), F, nullptr, DType::kBF16,
                         s);
    };
    json r_hand = moe_row(c, "wi", "moetrace grouped_gemm (gather fused)", flop_wi);
    json r_pre = moe_row(c, "wi", "moetrace grouped_gemm (A pre-permuted)", flop_wi);
    json r_grp = moe_row(c, "wi", "cublasGemmGroupedBatchedEx", flop_wi);
    json r_lt = moe_row(c, "wi", "cuBLASLt per-expert loop", flop_wi);
    for (const DeviceBuffer* b : {&out_hand, &out_hand_pre, &out_grp, &out_lt}) poison(*b, s);
    hand(true);
    hand(false);
    const std::vector<uint16_t> host_hand = download_u16(out_hand.get(), T * F, s);
    const Diff ref = sampled_reference(T, F, d, row_expert, perm, seed_h, true, seed_wi, true, {},
                                       bf16_at(host_hand, F));
    set_diff(r_hand, ref);
    r_hand["note"] = r_hand["note"].get<std::string>() + "vs fp64 reference on sampled rows";
    set_diff(r_pre, device_diff(out_hand_pre.as<__nv_bfloat16>(), out_hand.as<__nv_bfloat16>(),
                                T * F, false, s));
    const double ms_gather = time_ms(s, reps, gather);
    set_time(r_hand, time_ms(s, reps, [&] { hand(true); }), 0);
    set_time(r_pre, time_ms(s, reps, [&] { hand(false); }), ms_gather);

    const Grouped g = grouped_problem(counts, offsets, hp.get(), wi.get(), out_grp.get(), F, d, 2);
    const cublasStatus_t st = grouped_run(L.blas, g, CUDA_R_16BF);
    if (st == CUBLAS_STATUS_SUCCESS) {
      // No epilogue in the grouped API: the relu is applied by the comparison (and would be one
      // more pass, or fused into the next GEMM's load, in an engine).
      set_diff(r_grp, device_diff(out_hand.as<__nv_bfloat16>(), out_grp.as<__nv_bfloat16>(), T * F,
                                  true, s));
      r_grp["note"] = r_grp["note"].get<std::string>() + "no relu epilogue; ";
      set_time(r_grp,
               time_ms(s, reps, [&] { check_lib(grouped_run(L.blas, g, CUDA_R_16BF), "grouped"); }),
               ms_gather);
      // What the engine would pay for host-side group sizes: the counts to the host (stream
      // synchronized: the launch queue drains), the pointer tables back, then the call.
      cuda::PinnedBuffer pinned(E * 4 + g.host_ptrs.size() * sizeof(void*));
      auto fetch = [&] {
        MT_CUDA_CHECK(
            cudaMemcpyAsync(pinned.get(), d_counts.get(), E * 4, cudaMemcpyDeviceToHost, s));
        MT_CUDA_CHECK(cudaStreamSynchronize(s));
      };
      double t0 = bench::now_s();
      for (int i = 0; i < 50; ++i) fetch();
      const double fetch_us = (bench::now_s() - t0) / 50 * 1e6;
      auto with_fetch = [&] {
        fetch();
        std::memcpy(static_cast<char*>(pinned.get()) + E * 4, g.host_ptrs.data(),
                    g.host_ptrs.size() * sizeof(void*));
        MT_CUDA_CHECK(cudaMemcpyAsync(g.ptrs.get(), static_cast<char*>(pinned.get()) + E * 4,
                                      g.ptrs.bytes(), cudaMemcpyHostToDevice, s));
        check_lib(grouped_run(L.blas, g, CUDA_R_16BF), "grouped");
      };
      with_fetch();
      MT_CUDA_CHECK(cudaStreamSynchronize(s));
      t0 = bench::now_s();
      for (int i = 0; i < reps; ++i) with_fetch();
      MT_CUDA_CHECK(cudaStreamSynchronize(s));
      const double with_ms = (bench::now_s() - t0) / reps * 1e3;
      sync.push_back({{"model", c.model},
                      {"experts", E},
                      {"load", c.skewed ? "skewed" : "uniform"},
                      {"idle_fetch_us", fetch_us},
                      {"grouped_ms", r_grp["ms"]},
                      {"grouped_with_fetch_ms", with_ms},
                      {"extra_us", (with_ms - r_grp["ms"].get<double>()) * 1e3}});
    } else {
      r_grp["note"] = std::string("refused: ") + cublasGetStatusString(st);
    }

    lt_loop(true);
    set_diff(r_lt, device_diff(out_lt.as<__nv_bfloat16>(), out_hand.as<__nv_bfloat16>(), T * F,
                               false, s));
    set_time(r_lt, time_ms(s, reps, [&] { lt_loop(true); }), ms_gather);
    for (json* r : {&r_hand, &r_pre, &r_grp, &r_lt}) rows.push_back(*r);
  }

  // ---- wo: [T, F] -> x[T, d] += gate * (.), rows of a2 in expert order ----
  const double flop_wo = 2.0 * T * d * F;
  {
    auto hand = [&] {
      cuda::grouped_gemm(a2.get(), F, false, d_perm.as<int32_t>(), wo.get(), d, F,
                         d_tile_expert.as<int32_t>(), d_tile_row.as<int32_t>(),
                         d_offsets.as<int32_t>(), max_tiles, cuda::GroupedEpilogue::kGateResidual,
                         x_hand.get(), d, gate.as<float>(), DType::kBF16, s);
    };
    json r_hand = moe_row(c, "wo", "moetrace grouped_gemm (gate+scatter fused)", flop_wo);
    json r_grp = moe_row(c, "wo", "cublasGemmGroupedBatchedEx", flop_wo);
    json r_lt = moe_row(c, "wo", "cuBLASLt per-expert loop", flop_wo);
    MT_CUDA_CHECK(cudaMemsetAsync(x_hand.get(), 0, x_hand.bytes(), s));  // the residual: zero
    poison(y_grp, s);
    poison(y_lt, s);
    hand();
    const std::vector<float> xh = download_f32(x_hand.get(), T * d, s);
    // x_hand[perm[r]] is gate * (row r of the GEMM): read in the permuted order.
    const auto hand_at = [&](int64_t r, int64_t n) -> double { return xh[perm[r] * d + n]; };
    set_diff(r_hand, sampled_reference(T, d, F, row_expert, perm, seed_a2, false, seed_wo, false,
                                       h_gate, hand_at));
    r_hand["note"] = r_hand["note"].get<std::string>() + "vs fp64 reference on sampled rows";
    // A library's output y[r] against the hand kernel's: gate[perm[r]] * y[r] vs x_hand[perm[r]].
    auto lib_diff = [&](const DeviceBuffer& y, bool f32) {
      Diff df;
      const std::vector<float> yf = f32 ? download_f32(y.get(), T * d, s) : std::vector<float>();
      const std::vector<uint16_t> yb =
          f32 ? std::vector<uint16_t>() : download_u16(y.get(), T * d, s);
      for (int64_t r = 0; r < T; ++r)
        for (int64_t n = 0; n < d; ++n) {
          const double v = h_gate[perm[r]] * (f32 ? yf[r * d + n] : bf16_value(yb[r * d + n]));
          const double want = hand_at(r, n);
          if (!std::isfinite(v) || !std::isfinite(want)) {
            ++df.nonfinite;
            continue;
          }
          df.max_abs = std::max(df.max_abs, std::abs(v - want));
          df.max_ref = std::max(df.max_ref, std::abs(want));
        }
      return df;
    };
    set_time(r_hand, time_ms(s, reps, hand), 0);

    // The library's output in fp32 (what the residual add wants); bf16 if fp32 is refused.
    Grouped g = grouped_problem(counts, offsets, a2.get(), wo.get(), y_grp.get(), d, F, 4);
    cudaDataType_t ct = CUDA_R_32F;
    cublasStatus_t st = grouped_run(L.blas, g, ct);
    if (st != CUBLAS_STATUS_SUCCESS) {
      r_grp["note"] = std::string("fp32 C refused (") + cublasGetStatusString(st) + "): bf16 C; ";
      ct = CUDA_R_16BF;
      poison(y_grp, s);
      g = grouped_problem(counts, offsets, a2.get(), wo.get(), y_grp.get(), d, F, 2);
      st = grouped_run(L.blas, g, ct);
    }
    if (st == CUBLAS_STATUS_SUCCESS) {
      set_diff(r_grp, lib_diff(y_grp, ct == CUDA_R_32F));
      auto scatter = [&] {
        if (ct == CUDA_R_32F)
          scatter_add_kernel<<<grid_for(T * d), 256, 0, s>>>(
              y_grp.as<float>(), d_perm.as<int32_t>(), gate.as<float>(), T, d, x_hand.as<float>());
        else
          scatter_add_kernel<<<grid_for(T * d), 256, 0, s>>>(y_grp.as<__nv_bfloat16>(),
                                                             d_perm.as<int32_t>(), gate.as<float>(),
                                                             T, d, x_hand.as<float>());
        MT_CUDA_CHECK_LAUNCH();
      };
      set_time(r_grp, time_ms(s, reps, [&] { check_lib(grouped_run(L.blas, g, ct), "grouped"); }),
               time_ms(s, reps, scatter));
    } else {
      r_grp["note"] = r_grp["note"].get<std::string>() + "refused: " + cublasGetStatusString(st);
    }

    lt_loop(false);
    set_diff(r_lt, lib_diff(y_lt, true));
    auto scatter_lt = [&] {
      scatter_add_kernel<<<grid_for(T * d), 256, 0, s>>>(
          y_lt.as<float>(), d_perm.as<int32_t>(), gate.as<float>(), T, d, x_hand.as<float>());
      MT_CUDA_CHECK_LAUNCH();
    };
    set_time(r_lt, time_ms(s, reps, [&] { lt_loop(false); }), time_ms(s, reps, scatter_lt));
    for (json* r : {&r_hand, &r_grp, &r_lt}) rows.push_back(*r);
  }
  return load;
}

// ---- Attention ----------------------------------------------------------------------------------

json run_attention(cudaStream_t s, int reps) {
  const int64_t B = 128, H = 12, S = 256, dk = 64, inner = H * dk;
  const uint64_t seed_qkv = 21, seed_bias = 22;
  const float qkv_scale = 0.5f;
  DeviceBuffer qkv(B * S * 3 * inner * 2), bias((H * (2 * S - 1)) * 4), mask(B * S * 4),
      ctx(B * S * inner * 2);
  fill_bf16(qkv.get(), B * S * 3 * inner, seed_qkv, qkv_scale, s);
  fill_f32(bias.get(), H * (2 * S - 1), seed_bias, -1.f, 1.f, s);
  // Padding: sequence b holds S - (37 b mod S/2) tokens (bench/attention_libs.py uses the same).
  std::vector<int32_t> h_mask(static_cast<size_t>(B * S));
  std::vector<int64_t> len(static_cast<size_t>(B));
  for (int64_t b = 0; b < B; ++b) {
    len[b] = S - (37 * b) % (S / 2);
    for (int64_t j = 0; j < S; ++j) h_mask[b * S + j] = j < len[b] ? 1 : 0;
  }
  cuda::upload(mask.get(), h_mask.data(), h_mask.size() * 4, s);
  const std::vector<float> h_bias = download_f32(bias.get(), H * (2 * S - 1), s);
  const double flop = 4.0 * B * H * S * S * dk;
  json rows = json::array();
  if (!cuda::flash_attention_supported(dk, S, DType::kBF16)) {
    rows.push_back({{"impl", "moetrace flash_attention"}, {"note", "not supported at this shape"}});
    return rows;
  }
  for (bool masked : {true, false}) {
    const int32_t* m = masked ? mask.as<int32_t>() : nullptr;
    auto run = [&] {
      cuda::flash_attention(qkv.get(), bias.as<float>(), m, B, S, H, dk, ctx.get(), DType::kBF16,
                            s);
    };
    poison(ctx, s);
    run();
    const std::vector<uint16_t> out = download_u16(ctx.get(), B * S * inner, s);
    // fp64 reference of sampled (b, h, i) rows.
    Diff df;
    std::mt19937_64 rng(masked ? 5 : 6);
    auto at = [&](int64_t b, int64_t j, int64_t part, int64_t h, int64_t c) {
      return input_bf16(seed_qkv, ((b * S + j) * 3 + part) * inner + h * dk + c, qkv_scale);
    };
    for (int i_s = 0; i_s < 24; ++i_s) {
      const int64_t b = static_cast<int64_t>(rng() % B), h = static_cast<int64_t>(rng() % H),
                    i = static_cast<int64_t>(rng() % S);
      const int64_t keys = masked ? len[b] : S;
      std::vector<double> p(static_cast<size_t>(keys));
      double mx = -1e300, sum = 0;
      for (int64_t j = 0; j < keys; ++j) {
        double sc = h_bias[h * (2 * S - 1) + j - i + S - 1];
        for (int64_t c = 0; c < dk; ++c) sc += at(b, i, 0, h, c) * at(b, j, 1, h, c);
        p[j] = sc;
        mx = std::max(mx, sc);
      }
      for (double& v : p) sum += (v = std::exp(v - mx));
      for (int64_t c = 0; c < dk; ++c) {
        double ref = 0;
        for (int64_t j = 0; j < keys; ++j) ref += p[j] / sum * at(b, j, 2, h, c);
        const double v = bf16_value(out[(b * S + i) * inner + h * dk + c]);
        if (!std::isfinite(v)) {
          ++df.nonfinite;
          continue;
        }
        df.max_abs = std::max(df.max_abs, std::abs(v - ref));
        df.max_ref = std::max(df.max_ref, std::abs(ref));
      }
    }
    const double ms = time_ms(s, reps, run);
    rows.push_back({{"impl", "moetrace flash_attention"},
                    {"B", B},
                    {"H", H},
                    {"S", S},
                    {"dk", dk},
                    {"mask", masked ? "bias [H,2S-1] + padding [B,S]" : "bias [H,2S-1]"},
                    {"ms", ms},
                    {"tflops", tflops(flop, ms)},
                    {"max_rel_err", std::isnan(df.rel()) ? json(nullptr) : json(df.rel())},
                    {"ok", df.ok()}});
  }
  return rows;
}

// ---- Dense GEMM: the engine's first heuristic against the best of the top N -----------------------

json run_dense(Libs& L, int64_t T, int reps, int search) {
  struct Shape {
    const char* name;
    int64_t N, K;
    DType out;
    bool accumulate, relu;
  };
  // As CudaSwitchModel calls them: qkv into bf16, o and wo accumulated into the fp32 residual.
  const Shape shapes[] = {{"qkv", 2304, 768, DType::kBF16, false, false},
                          {"o", 768, 768, DType::kF32, true, false},
                          {"wi dense (relu)", 3072, 768, DType::kBF16, false, true},
                          {"wo dense", 768, 3072, DType::kF32, true, false}};
  cuda::Blas blas(L.s);
  cudaStream_t s = L.s;
  json rows = json::array();
  for (const Shape& sh : shapes) {
    const int64_t M = T, N = sh.N, K = sh.K;
    const size_t osize = sh.out == DType::kF32 ? 4 : 2;
    DeviceBuffer A(M * K * 2), W(N * K * 2), D(M * N * osize), D_ref(M * N * osize);
    fill_bf16(A.get(), M * K, 31, 1.f, s);
    fill_bf16(W.get(), N * K, 32, 1.f, s);
    // A checked run starts from zero (accumulate: D += A·Wᵀ) or from NaN (D = A·Wᵀ).
    auto reset = [&](const DeviceBuffer& b) {
      if (sh.accumulate)
        MT_CUDA_CHECK(cudaMemsetAsync(b.get(), 0, b.bytes(), s));
      else
        poison(b, s);
    };
    auto engine = [&] {
      blas.gemm_nt(cuda::GemmArgs{M, N, K, A.get(), K, W.get(), K, D_ref.get(), N, DType::kBF16,
                                  sh.out, sh.accumulate, sh.relu});
    };
    reset(D_ref);
    engine();
    const double flop = 2.0 * M * N * K;
    const double heur_ms = time_ms(s, reps, engine);
    reset(D_ref);
    engine();
    const auto plan =
        lt_plan(L.lt, M, N, K, sh.out == DType::kF32 ? CUDA_R_32F : CUDA_R_16BF, sh.relu, search);
    const float beta = sh.accumulate ? 1.f : 0.f;
    json algo_ms = json::array();
    double best_ms = 0;
    int best = -1, failed = 0, wrong = 0;
    for (size_t i = 0; i < plan->algos.size(); ++i) {
      reset(D);
      if (lt_run(L.lt, *plan, i, A.get(), W.get(), D.get(), beta, L.lt_ws.get(), s) !=
          CUBLAS_STATUS_SUCCESS) {
        ++failed;
        algo_ms.push_back(nullptr);
        continue;
      }
      const Diff df =
          sh.out == DType::kF32
              ? device_diff(D.as<float>(), D_ref.as<float>(), M * N, false, s)
              : device_diff(D.as<__nv_bfloat16>(), D_ref.as<__nv_bfloat16>(), M * N, false, s);
      if (!df.ok()) {
        ++wrong;
        algo_ms.push_back(nullptr);
        continue;
      }
      const double ms = time_ms(s, std::max(3, reps / 2), [&] {
        check_lib(lt_run(L.lt, *plan, i, A.get(), W.get(), D.get(), beta, L.lt_ws.get(), s),
                  "cublasLtMatmul");
      });
      algo_ms.push_back(ms);
      if (best < 0 || ms < best_ms) best_ms = ms, best = static_cast<int>(i);
    }
    rows.push_back({{"name", sh.name},
                    {"M", M},
                    {"N", N},
                    {"K", K},
                    {"out", sh.out == DType::kF32 ? "f32 (+=)" : "bf16"},
                    {"heuristic_ms", heur_ms},
                    {"heuristic_tflops", tflops(flop, heur_ms)},
                    {"best_ms", best < 0 ? json(nullptr) : json(best_ms)},
                    {"best_tflops", best < 0 ? json(nullptr) : json(tflops(flop, best_ms))},
                    {"best_index", best},
                    {"algos", plan->algos.size()},
                    {"algos_failed", failed},
                    {"algos_wrong", wrong},
                    {"speedup", best < 0 ? json(nullptr) : json(heur_ms / best_ms)},
                    {"algo_ms", algo_ms}});
  }
  return rows;
}

// ---- Output ---------------------------------------------------------------------------------------

std::string num(const json& v, const char* fmt) {
  if (!v.is_number()) return "-";
  char buf[32];
  std::snprintf(buf, sizeof buf, fmt, v.get<double>());
  return buf;
}

// "ok", "FAIL" (measured but disagrees) or "-" (not run: refused or unsupported).
const char* check(const json& r) {
  if (!r.value("ms", json()).is_number()) return "-";
  return r.value("ok", false) ? "ok" : "FAIL";
}

void print_tables(const json& j) {
  if (j.contains("moe")) {
    std::printf(
        "\n== grouped expert GEMM (bf16, fp32 accumulate; T=%lld; ms per call; 'total' adds "
        "the gather/scatter pass a library needs)\n",
        static_cast<long long>(j["tokens"].get<int64_t>()));
    for (const json& l : j["moe_loads"])
      std::printf("   %s E=%lld %s: max/mean load %.2f, min count %d\n",
                  l["model"].get<std::string>().c_str(),
                  static_cast<long long>(l["experts"].get<int64_t>()),
                  l["load"].get<std::string>().c_str(), l["max_over_mean"].get<double>(),
                  l["min_count"].get<int>());
    std::printf("%-4s %-7s %-3s %-44s %8s %8s %8s %10s %s\n", "E", "load", "gemm", "impl", "ms",
                "TFLOP/s", "total", "max rel", "check");
    for (const json& r : j["moe"])
      std::printf("%-4lld %-7s %-3s %-44s %8s %8s %8s %10s %s %s\n",
                  static_cast<long long>(r["experts"].get<int64_t>()),
                  r["load"].get<std::string>().c_str(), r["gemm"].get<std::string>().c_str(),
                  r["impl"].get<std::string>().c_str(), num(r["ms"], "%.3f").c_str(),
                  num(r["tflops"], "%.1f").c_str(), num(r["total_ms"], "%.3f").c_str(),
                  num(r["max_rel_diff"], "%.2e").c_str(), check(r),
                  r["note"].get<std::string>().c_str());
    for (const json& y : j["moe_sync"])
      std::printf(
          "   host group sizes, E=%lld %s: counts D2H + sync on an idle stream %.1f us; "
          "grouped call with the fetch %.3f ms (+%.1f us per call)\n",
          static_cast<long long>(y["experts"].get<int64_t>()), y["load"].get<std::string>().c_str(),
          y["idle_fetch_us"].get<double>(), y["grouped_with_fetch_ms"].get<double>(),
          y["extra_us"].get<double>());
  }
  if (j.contains("attention")) {
    std::printf("\n== attention (B=128, H=12, S=256, d_kv=64, bf16; FLOP = 4·B·H·S²·d_kv)\n");
    for (const json& r : j["attention"])
      std::printf("%-26s %-32s %8s ms %8s TFLOP/s  max rel err %s %s\n",
                  r["impl"].get<std::string>().c_str(), r.value("mask", "").c_str(),
                  num(r.value("ms", json()), "%.3f").c_str(),
                  num(r.value("tflops", json()), "%.1f").c_str(),
                  num(r.value("max_rel_err", json()), "%.2e").c_str(), check(r));
  }
  if (j.contains("dense")) {
    std::printf(
        "\n== dense cuBLASLt: the engine's first heuristic vs the best of the top N, each "
        "timed\n%-16s %-22s %-8s %9s %9s %9s %9s %5s %7s %s\n",
        "GEMM", "M x N x K", "out", "heur ms", "TFLOP/s", "best ms", "TFLOP/s", "index", "speedup",
        "algos (failed, wrong)");
    for (const json& r : j["dense"]) {
      const std::string shape = std::to_string(r["M"].get<int64_t>()) + " x " +
                                std::to_string(r["N"].get<int64_t>()) + " x " +
                                std::to_string(r["K"].get<int64_t>());
      std::printf("%-16s %-22s %-8s %9s %9s %9s %9s %5d %7s %zu (%d, %d)\n",
                  r["name"].get<std::string>().c_str(), shape.c_str(),
                  r["out"].get<std::string>().c_str(), num(r["heuristic_ms"], "%.3f").c_str(),
                  num(r["heuristic_tflops"], "%.1f").c_str(), num(r["best_ms"], "%.3f").c_str(),
                  num(r["best_tflops"], "%.1f").c_str(), r["best_index"].get<int>(),
                  num(r["speedup"], "%.3fx").c_str(), r["algos"].get<size_t>(),
                  r["algos_failed"].get<int>(), r["algos_wrong"].get<int>());
    }
  }
}

int main_impl(int argc, char** argv) {
  const Args a = parse(argc, argv);
  if (!cuda::device_available()) fail("no CUDA device visible");
  const double t_start = bench::now_s();
  cuda::Stream stream;
  Libs L{stream.get(), nullptr, nullptr};
  MT_CUBLAS_CHECK(cublasCreate(&L.blas));
  MT_CUBLAS_CHECK(cublasSetStream(L.blas, L.s));
  MT_CUBLAS_CHECK(cublasSetWorkspace(L.blas, L.ws.get(), L.ws.bytes()));
  MT_CUBLAS_CHECK(cublasLtCreate(&L.lt));
  int rt = 0, drv = 0, cublas_v = 0;
  MT_CUDA_CHECK(cudaRuntimeGetVersion(&rt));
  MT_CUDA_CHECK(cudaDriverGetVersion(&drv));
  MT_CUBLAS_CHECK(cublasGetVersion(L.blas, &cublas_v));
  json j = {{"benchmark", "bench_libs"}, {"date", bench::today_utc()},
            {"host", bench::hostname()}, {"gpu", std::string(cuda::device_name())},
            {"cuda_runtime", rt},        {"cuda_driver", drv},
            {"cublas", cublas_v},        {"cublaslt", cublasLtGetVersion()},
            {"tokens", a.tokens},        {"reps", a.reps}};
  std::printf("bench_libs on %s, CUDA runtime %d, driver %d, cuBLAS %d, cuBLASLt %zu\n",
              std::string(cuda::device_name()).c_str(), rt, drv, cublas_v, cublasLtGetVersion());
  // A part (or MoE case) that throws is reported and the others still run: one device call
  // should bring back everything that works.
  json errors = json::array();
  auto guarded = [&](const std::string& what, auto&& f) {
    try {
      f();
    } catch (const std::exception& e) {
      std::printf("%s failed: %s\n", what.c_str(), e.what());
      errors.push_back(what + ": " + e.what());
    }
    std::fflush(stdout);
  };
  if (has_part(a, "moe")) {
    json rows = json::array(), loads = json::array(), sync = json::array();
    const MoeCase cases[] = {{"switch-base-128", 128, true},
                             {"switch-base-128", 128, false},
                             {"switch-base-8", 8, true},
                             {"switch-base-8", 8, false}};
    for (const MoeCase& c : cases) {
      const std::string name = "moe " + c.model + (c.skewed ? " skewed" : " uniform");
      guarded(name, [&] { loads.push_back(run_moe(L, c, a.tokens, a.reps, rows, sync)); });
      std::printf("%s (%.1f s)\n", name.c_str(), bench::now_s() - t_start);
    }
    j["moe"] = rows;
    j["moe_loads"] = loads;
    j["moe_sync"] = sync;
  }
  if (has_part(a, "attention"))
    guarded("attention", [&] { j["attention"] = run_attention(L.s, a.reps); });
  if (has_part(a, "dense"))
    guarded("dense", [&] { j["dense"] = run_dense(L, a.tokens, a.reps, a.search); });
  j["errors"] = errors;
  cublasLtDestroy(L.lt);
  cublasDestroy(L.blas);
  j["wall_s"] = bench::now_s() - t_start;
  print_tables(j);
  if (!a.json.empty()) {
    std::ofstream(a.json) << j.dump(1) << "\n";
    std::printf("wrote %s (%.1f s)\n", a.json.c_str(), j["wall_s"].get<double>());
  }
  for (const json& e : errors) std::printf("ERROR %s\n", e.get<std::string>().c_str());
  if (!errors.empty()) return 3;
  // Exit 2 when a measured implementation disagrees (a refusal is a result, not a failure).
  for (const char* part : {"moe", "attention"})
    if (j.contains(part))
      for (const json& r : j[part])
        if (r.value("ms", json()).is_number() && !r.value("ok", false)) return 2;
  return 0;
}

}  // namespace
}  // namespace moetrace

int main(int argc, char** argv) {
  try {
    return moetrace::main_impl(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_libs: %s\n", e.what());
    return 1;
  }
}
