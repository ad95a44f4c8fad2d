// CudaLmModel's composition of ops, run with their CPU twins (kernels/cpu/ops.h) in float32 on the
// LM fixtures, against the transformers reference: the weight layouts the GPU engine uploads (q|k|v
// stacked, gate/up interleaved), the q/k preparation order, the scale folded into q, the KV cache
// rows, the mask stride, the top-k slots and their combine, and generate's positions are checked
// here without a GPU (the GPU ops are checked against these twins by tests/backend). It mirrors
// CudaLmModel::Impl::layers_pass / forward / generate step for step: change both together.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>
#include <tuple>

#include "io/safetensors.h"
#include "kernels/cpu/ops.h"
#include "model/cuda/cuda_lm_model.h"
#include "model/forward.h"
#include "model/lm/lm_model.h"

namespace moetrace {
namespace {

namespace fs = std::filesystem;
const fs::path kLmFixtures = fs::path(MOETRACE_TEST_DATA) / "fixtures_lm";

std::vector<float> f32(const Matrix& m) {
  std::vector<float> s;
  const float* p = m.get(s);
  return std::vector<float>(p, p + m.rows * m.cols);
}
std::vector<float> gate_up(const LmMlp& m) {  // [2F, d], rows interleaved
  const auto g = f32(m.gate), u = f32(m.up);
  const int64_t F = m.gate.rows, d = m.gate.cols;
  std::vector<float> out(static_cast<size_t>(2 * F * d));
  for (int64_t f = 0; f < F; ++f) {
    std::copy_n(g.begin() + f * d, d, out.begin() + 2 * f * d);
    std::copy_n(u.begin() + f * d, d, out.begin() + (2 * f + 1) * d);
  }
  return out;
}
void gemm(const float* A, int64_t M, int64_t K, const std::vector<float>& W, int64_t N, float* D,
          bool acc) {
  cpu::gemm_nt(M, N, K, 1.f, A, K, W.data(), K, acc ? 1.f : 0.f, D, N);
}

struct TwinLayer {
  std::vector<float> in_norm, post_norm, qkv, bias, qn, kn, o, o_bias, gu, down, router, sgu, sdown,
      sgate;
  bool sparse = false, shared = false;
};

// The GPU engine's pass with the CPU twins, act = F32.
struct Twin {
  const LmConfig& c;
  std::vector<TwinLayer> layers;
  std::vector<float> embed, final_norm, lm_head, cos, sin;
  int64_t d, H, KV, hd, qn, kn, cols, E, k, F, Fs, Fd, V, L;
  std::vector<float> kv;  // [L, B, Smax, 2*kn]
  std::vector<int32_t> mask;
  int64_t B = 0, Smax = 0;

  explicit Twin(const LmModel& m) : c(m.config()) {
    d = c.hidden_size, H = c.num_attention_heads, KV = c.num_key_value_heads, hd = c.head_dim;
    qn = H * hd, kn = KV * hd, cols = qn + 2 * kn, E = c.num_experts, k = c.top_k;
    F = c.moe_intermediate_size, Fs = c.shared_expert_intermediate_size, Fd = c.intermediate_size;
    V = c.vocab_size, L = c.num_hidden_layers;
    const LmWeights& w = m.weights();
    embed = f32(w.embed);
    final_norm = w.final_norm;
    lm_head = f32(w.lm_head);
    for (const LmLayer& s : w.layers) {
      TwinLayer t;
      t.in_norm = s.input_norm;
      t.post_norm = s.post_attn_norm;
      for (const Matrix* p : {&s.attn.q, &s.attn.k, &s.attn.v}) {
        const auto v = f32(*p);
        t.qkv.insert(t.qkv.end(), v.begin(), v.end());
      }
      if (!s.attn.q_bias.empty()) {
        t.bias = s.attn.q_bias;
        t.bias.insert(t.bias.end(), s.attn.k_bias.begin(), s.attn.k_bias.end());
        t.bias.insert(t.bias.end(), s.attn.v_bias.begin(), s.attn.v_bias.end());
      }
      t.qn = s.attn.q_norm;
      t.kn = s.attn.k_norm;
      t.o = f32(s.attn.o);
      t.o_bias = s.attn.o_bias;
      t.sparse = s.sparse;
      if (s.sparse) {
        t.router = f32(s.moe.router);
        for (const LmMlp& e : s.moe.experts) {
          const auto g = gate_up(e), dn = f32(e.down);
          t.gu.insert(t.gu.end(), g.begin(), g.end());
          t.down.insert(t.down.end(), dn.begin(), dn.end());
        }
        t.shared = s.moe.has_shared;
        if (t.shared) {
          t.sgu = gate_up(s.moe.shared);
          t.sdown = f32(s.moe.shared.down);
          t.sgate = f32(s.moe.shared_gate);
        }
      } else {
        t.gu = gate_up(s.dense);
        t.down = f32(s.dense.down);
      }
      layers.push_back(std::move(t));
    }
    cpu::rope_table(rope_inv_freq(c), 4096, cos, sin);
  }

  void start(const Batch& b, int64_t smax) {
    B = b.B;
    Smax = smax;
    kv.assign(static_cast<size_t>(L * B * Smax * 2 * kn), 0.f);
    mask.assign(static_cast<size_t>(B * Smax), 1);
    for (int64_t i = 0; i < B; ++i)
      std::copy_n(b.attention_mask.begin() + i * b.S, b.S, mask.begin() + i * Smax);
  }

  // CudaLmModel::Impl::layers_pass; keys[i] gets the MoE layers' (hidden, logits, expert, weight).
  void layers_pass(std::vector<float>& x, int64_t Sq, int64_t t0, const int32_t* pos,
                   std::map<std::string, std::vector<float>>* keys) {
    const int64_t n = B * Sq, ldkv = 2 * kn;
    const auto eps = static_cast<float>(c.rms_norm_eps);
    const auto scale = static_cast<float>(std::pow(static_cast<double>(hd), -0.5));
    const auto qk = c.qk_norm == QkNorm::kFull      ? cpu::QkNormKind::kFull
                    : c.qk_norm == QkNorm::kPerHead ? cpu::QkNormKind::kPerHead
                                                    : cpu::QkNormKind::kNone;
    std::vector<float> h(static_cast<size_t>(n * d)), hr(h.size()),
        qkv(static_cast<size_t>(n * cols)), q(static_cast<size_t>(n * qn)), ctx(q.size());
    for (int64_t i = 0; i < L; ++i) {
      const TwinLayer& Ly = layers[static_cast<size_t>(i)];
      cpu::rmsnorm(x.data(), Ly.in_norm.data(), n, d, eps, h.data());
      gemm(h.data(), n, d, Ly.qkv, cols, qkv.data(), false);
      float* cache = kv.data() + i * B * Smax * ldkv;
      cpu::lm_qkv_rope(qkv.data(), Ly.bias.empty() ? nullptr : Ly.bias.data(),
                       static_cast<float>(c.clip_qkv), qk, Ly.qn.data(), Ly.kn.data(), eps, pos,
                       cos.data(), sin.data(), scale, B, Sq, H, KV, hd, q.data(), qn, cache, ldkv,
                       Smax * ldkv, t0, DType::kF32);
      cpu::lm_attention(q.data(), qn, cache, cache + kn, ldkv, Smax * ldkv, mask.data(), Smax,
                        c.sliding_window, B, H, KV, Sq, t0 + Sq, hd, ctx.data(), qn, DType::kF32);
      gemm(ctx.data(), n, qn, Ly.o, d, x.data(), true);
      for (int64_t r = 0; r < n && !Ly.o_bias.empty(); ++r)
        for (int64_t j = 0; j < d; ++j) x[r * d + j] += Ly.o_bias[j];
      cpu::rmsnorm(x.data(), Ly.post_norm.data(), n, d, eps, h.data(), DType::kF32, hr.data());
      if (!Ly.sparse) {
        std::vector<float> gu(static_cast<size_t>(n * 2 * Fd)), mid(static_cast<size_t>(n * Fd));
        gemm(h.data(), n, d, Ly.gu, 2 * Fd, gu.data(), false);
        cpu::swiglu(gu.data(), n, Fd, mid.data(), DType::kF32);
        gemm(mid.data(), n, Fd, Ly.down, d, x.data(), true);
        continue;
      }
      std::vector<float> logits(static_cast<size_t>(n * E)), weight(static_cast<size_t>(n * k)),
          rows(static_cast<size_t>(n * k * d));
      std::vector<int32_t> expert(static_cast<size_t>(n * k)), counts(static_cast<size_t>(E));
      gemm(hr.data(), n, d, Ly.router, E, logits.data(), false);
      cpu::moe_topk(logits.data(), n, E, k, c.norm_topk_prob, expert.data(), weight.data(),
                    counts.data());
      auto w = [&](int64_t e, std::vector<float>&, std::vector<float>&) {
        return cpu::SwiGluWeights{Ly.gu.data() + e * 2 * F * d, Ly.down.data() + e * d * F};
      };
      cpu::moe_swiglu_experts(h.data(), n, d, F, E, k, w, expert.data(), DType::kF32, rows.data());
      std::vector<float> sh, sg;
      if (Ly.shared) {
        std::vector<float> gu(static_cast<size_t>(n * 2 * Fs)), mid(static_cast<size_t>(n * Fs));
        sh.resize(static_cast<size_t>(n * d));
        sg.resize(static_cast<size_t>(n));
        gemm(h.data(), n, d, Ly.sgu, 2 * Fs, gu.data(), false);
        cpu::swiglu(gu.data(), n, Fs, mid.data(), DType::kF32);
        gemm(mid.data(), n, Fs, Ly.sdown, d, sh.data(), false);
        gemm(hr.data(), n, d, Ly.sgate, 1, sg.data(), false);
      }
      cpu::moe_combine(rows.data(), weight.data(), n, k, d, sh.empty() ? nullptr : sh.data(),
                       sg.empty() ? nullptr : sg.data(), DType::kF32, x.data());
      if (keys != nullptr) {
        const std::string p = std::to_string(i) + ".";
        (*keys)[p + "hidden"] = hr;
        (*keys)[p + "logits"] = logits;
        (*keys)[p + "expert"].assign(expert.begin(), expert.end());
        (*keys)[p + "weight"] = weight;
      }
    }
  }

  std::vector<float> head(std::vector<float> x, int64_t n) {
    cpu::rmsnorm(x.data(), final_norm.data(), n, d, static_cast<float>(c.rms_norm_eps), x.data());
    std::vector<float> logits(static_cast<size_t>(n * V));
    gemm(x.data(), n, d, lm_head, V, logits.data(), false);
    return logits;
  }

  std::vector<float> embed_rows(const int32_t* ids, int64_t n) {
    std::vector<float> x(static_cast<size_t>(n * d));
    cpu::embed(ids, embed.data(), DType::kF32, n, d, x.data());
    return x;
  }
};

double rel(const std::vector<float>& a, const TensorView& b) {
  std::vector<float> y(static_cast<size_t>(b.numel()));
  convert_to_f32(b.dtype, b.data, y.data(), y.size());
  if (a.size() != y.size()) return INFINITY;
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    num += (double{a[i]} - y[i]) * (double{a[i]} - y[i]);
    den += double{y[i]} * y[i];
  }
  return std::sqrt(num / std::max(den, 1e-300));
}
std::vector<int64_t> ints(const TensorView& v) {
  std::vector<int64_t> out;
  for (int64_t i = 0; i < v.numel(); ++i)
    out.push_back(v.dtype == DType::kI64 ? v.as<int64_t>()[i] : v.as<int32_t>()[i]);
  return out;
}

class LmTwinPipeline : public ::testing::TestWithParam<const char*> {};

TEST_P(LmTwinPipeline, MatchesTransformersReference) {
  const fs::path dir = kLmFixtures / GetParam();
  ASSERT_TRUE(fs::exists(dir / "reference.safetensors")) << dir;
  SafetensorsFile ref = SafetensorsFile::open(dir / "reference.safetensors");
  const ForwardInputs in = read_forward_inputs(dir / "inputs.safetensors");
  const auto model = LmModel::load(dir / "model");
  Twin tw(*model);
  const Batch& b = in.batch;
  const int64_t B = b.B, S = b.S;
  const auto blocks = model->config().sparse_layers();
  // forward: positions 0..S-1, a cache of S.
  {
    tw.start(b, S);
    std::vector<int32_t> pos(static_cast<size_t>(B * S));
    for (int64_t i = 0; i < B * S; ++i) pos[static_cast<size_t>(i)] = static_cast<int32_t>(i % S);
    std::map<std::string, std::vector<float>> keys;
    auto x = tw.embed_rows(b.input_ids.data(), B * S);
    tw.layers_pass(x, S, 0, pos.data(), &keys);
    EXPECT_LT(rel(tw.head(x, B * S), ref.find("logits")->view), 1e-4) << "logits";
    for (size_t m = 0; m < blocks.size(); ++m) {
      const std::string r = "router." + std::to_string(m) + ".",
                        p = std::to_string(blocks[m]) + ".";
      EXPECT_LT(rel(keys[p + "hidden"], ref.find(r + "router_input")->view), 1e-4) << r;
      EXPECT_LT(rel(keys[p + "logits"], ref.find(r + "router_logits")->view), 1e-4) << r;
      EXPECT_LT(rel(keys[p + "weight"], ref.find(r + "topk_weights")->view), 1e-4) << r;
      const auto want = ints(ref.find(r + "topk_ids")->view);
      ASSERT_EQ(keys[p + "expert"].size(), want.size()) << r;
      for (size_t i = 0; i < want.size(); ++i)
        ASSERT_EQ(static_cast<int64_t>(keys[p + "expert"][i]), want[i]) << r << " slot " << i;
    }
  }
  // generate: generate's prompt positions, the first token from column S-1, cached steps.
  std::ifstream meta(dir / "meta.json");
  const int64_t N = nlohmann::json::parse(meta).at("generate_new_tokens").get<int64_t>();
  tw.start(b, S + N);
  const std::vector<int32_t> pos = lm_generate_positions(b);
  auto x = tw.embed_rows(b.input_ids.data(), B * S);
  tw.layers_pass(x, S, 0, pos.data(), nullptr);
  std::vector<float> last(static_cast<size_t>(B * tw.d));
  for (int64_t i = 0; i < B; ++i)
    std::copy_n(x.begin() + ((i + 1) * S - 1) * tw.d, tw.d, last.begin() + i * tw.d);
  std::vector<std::vector<int32_t>> seqs(static_cast<size_t>(B));
  std::vector<int32_t> next(static_cast<size_t>(B));
  for (int64_t t = 0; t < N; ++t) {
    if (t > 0) {
      std::vector<int32_t> sp(static_cast<size_t>(B));
      for (int64_t i = 0; i < B; ++i)
        sp[static_cast<size_t>(i)] =
            pos[static_cast<size_t>(i * S + S - 1)] + static_cast<int32_t>(t);
      last = tw.embed_rows(next.data(), B);
      tw.layers_pass(last, 1, S + t - 1, sp.data(), nullptr);
    }
    const auto logits = tw.head(last, B);
    for (int64_t i = 0; i < B; ++i) {
      std::vector<float> l(logits.begin() + i * tw.V, logits.begin() + (i + 1) * tw.V);
      for (int64_t id : model->banned_ids())
        if (id >= 0 && id < tw.V) l[static_cast<size_t>(id)] = -INFINITY;
      next[static_cast<size_t>(i)] =
          static_cast<int32_t>(std::max_element(l.begin(), l.end()) - l.begin());
      seqs[static_cast<size_t>(i)].push_back(next[static_cast<size_t>(i)]);
    }
  }
  const auto want = ints(ref.find("generated_ids")->view);
  for (int64_t i = 0; i < B; ++i)
    for (int64_t t = 0; t < N; ++t)
      EXPECT_EQ(seqs[static_cast<size_t>(i)][static_cast<size_t>(t)], want[i * (S + N) + S + t])
          << "row " << i << " new token " << t;
}

// The GPU router's twin (cpu::moe_topk, which tests/backend holds the GPU's moe_topk to) gives
// exactly what the routing rule (lm_topk_route) gives, ties and renormalization included.
TEST(LmTwinRouting, MoeTopkIsTheRoutingRule) {
  for (const auto& [E, k, renorm] :
       {std::tuple{64, 8, false}, std::tuple{64, 8, true}, std::tuple{8, 2, true},
        std::tuple{60, 4, false}, std::tuple{7, 1, false}}) {
    const int64_t T = 257;
    std::mt19937_64 rng(static_cast<uint64_t>(E * 31 + k));
    std::uniform_real_distribution<float> u(-4.f, 4.f);
    std::vector<float> logits(static_cast<size_t>(T * E));
    for (auto& v : logits) v = u(rng);
    for (int64_t t = 0; t < T; t += 3) {  // exact ties among the top
      logits[static_cast<size_t>(t * E + E - 1)] = 9.f;
      logits[static_cast<size_t>(t * E + 1)] = 9.f;
    }
    std::vector<int32_t> ids_a(static_cast<size_t>(T * k)), ids_b(ids_a.size()),
        counts(static_cast<size_t>(E));
    std::vector<float> w_a(ids_a.size()), w_b(ids_a.size());
    cpu::moe_topk(logits.data(), T, E, k, renorm, ids_a.data(), w_a.data(), counts.data());
    lm_topk_route(logits.data(), T, E, k, renorm, ids_b.data(), w_b.data());
    EXPECT_EQ(ids_a, ids_b) << "E " << E << " k " << k;
    EXPECT_EQ(w_a, w_b) << "E " << E << " k " << k << ": the weights differ in some bit";
    EXPECT_EQ(ids_a[0], 1) << "a tie goes to the lowest index";
  }
}

INSTANTIATE_TEST_SUITE_P(Families, LmTwinPipeline,
                         ::testing::Values("olmoe", "mixtral", "qwen2_moe", "qwen3_moe"),
                         [](const auto& info) { return std::string(info.param); });

}  // namespace
}  // namespace moetrace
