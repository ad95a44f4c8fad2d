// Precision "mixed" (fp16 GEMM operands, routing decided in fp32): the decision and gate come from
// the float32 probabilities of the very logits the engine observed, where bf16/fp16 round them first.
// Precision "faithful" (mixed with the encoder attention in fp16 pairs): closer to fp32 than mixed.
// Runs on a GPU only (skips otherwise, like every tests/cuda test).
#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "core/error.h"
#include "cuda_test_util.h"
#include "model/cuda/cuda_switch_model.h"
#include "model/cuda/hf_init_weights.h"
#include "model/random_weights.h"
#include "model/recording_observer.h"
#include "model/switch_model.h"
#include "model_test_util.h"

namespace moetrace::cuda::test {
namespace {

TEST(CudaPrecisionOptions, EverySpellingMapsToItsOptions) {
  EXPECT_EQ(cuda_options_for_precision("fp32").precision, DType::kF32);
  EXPECT_EQ(cuda_options_for_precision("fp16").precision, DType::kF16);
  const CudaOptions bf16 = cuda_options_for_precision("bf16");
  EXPECT_EQ(bf16.precision, DType::kBF16);
  EXPECT_FALSE(bf16.fp32.routing);
  const CudaOptions mixed = cuda_options_for_precision("mixed");
  EXPECT_EQ(mixed.precision, DType::kF16);
  EXPECT_TRUE(mixed.fp32.routing);
  EXPECT_FALSE(mixed.fp32.attention_pairs);
  const CudaOptions faithful = cuda_options_for_precision("faithful");
  EXPECT_EQ(faithful.precision, DType::kF16);
  EXPECT_TRUE(faithful.fp32.routing);
  EXPECT_TRUE(faithful.fp32.attention_pairs);
  EXPECT_THROW(cuda_options_for_precision("f32"), Error);  // callers pass parse_precision_option's
}

// The softmax of one row of logits, in double: [E].
std::vector<double> softmax_row(const float* l, int64_t E) {
  double mx = -INFINITY, sum = 0;
  for (int64_t e = 0; e < E; ++e) mx = std::max(mx, static_cast<double>(l[e]));
  std::vector<double> p(static_cast<size_t>(E));
  for (int64_t e = 0; e < E; ++e) sum += p[e] = std::exp(static_cast<double>(l[e]) - mx);
  for (double& v : p) v /= sum;
  return p;
}

TEST_F(CudaTest, MixedDecidesOnFp32Probabilities) {
  SwitchConfig c = demo_config();
  auto src = make_hf_init_random_weights(c, RandomWeightOptions{7, DType::kBF16, true});
  const Batch batch = random_batch(6, 70, c.vocab_size, 3);
  auto gpu =
      CudaSwitchModel::from_source(c, src, LoadOptions{true}, cuda_options_for_precision("mixed"));
  EXPECT_EQ(gpu->precision(), DType::kF16);
  RecordingObserver got;
  gpu->encode(batch, &got);
  const int64_t E = c.num_experts;
  for (int blk : c.sparse_encoder_blocks()) {
    const std::string k = "enc." + std::to_string(blk) + ".";
    const auto logits = as_f32(got.last(k + "router_logits").view());
    const auto expert = as_f32(got.last(k + "expert").view());
    const auto gate = as_f32(got.last(k + "gate").view());
    for (int64_t t = 0; t < batch.B * batch.S; ++t) {
      const std::vector<double> p = softmax_row(logits.data() + t * E, E);
      const double best = *std::max_element(p.begin(), p.end());
      const auto e = static_cast<size_t>(expert[t]);
      // float32 decides within float32 rounding of the best (bf16: within 2^-8 of it), and the
      // gate is that float32 probability, not a bf16 one.
      ASSERT_GE(p[e], best * (1 - 1e-5)) << k << " token " << t;
      ASSERT_NEAR(gate[t], p[e], 1e-5 * p[e]) << k << " token " << t;
    }
  }
}

// Mixed is at least as close to the fp32 CPU engine's routing as bf16 (the same GEMMs, a finer
// decision), on the same weights and batch.
TEST_F(CudaTest, MixedAgreesWithFp32AtLeastAsOftenAsBf16) {
  SwitchConfig c = demo_config();
  auto src = make_hf_init_random_weights(c, RandomWeightOptions{7, DType::kBF16, true});
  auto cpu = SwitchModel::from_source(c, src, LoadOptions{true});
  const Batch batch = random_batch(8, 90, c.vocab_size, 5);
  RecordingObserver want;
  cpu->encode(batch, &want);
  auto agreement = [&](const char* precision) {
    auto gpu = CudaSwitchModel::from_source(c, src, LoadOptions{true},
                                            cuda_options_for_precision(precision));
    RecordingObserver got;
    gpu->encode(batch, &got);
    int64_t agree = 0, total = 0;
    for (int blk : c.sparse_encoder_blocks()) {
      const std::string k = "enc." + std::to_string(blk) + ".expert";
      const auto g = as_f32(got.last(k).view()), w = as_f32(want.last(k).view());
      for (size_t t = 0; t < g.size(); ++t) {
        if (batch.attention_mask[t] == 0) continue;
        agree += g[t] == w[t];
        ++total;
      }
    }
    return static_cast<double>(agree) / static_cast<double>(total);
  };
  const double bf16 = agreement("bf16"), mixed = agreement("mixed");
  EXPECT_GE(mixed, bf16) << "bf16 " << bf16 << ", mixed " << mixed;
  EXPECT_GE(mixed, 0.99);
}

// The router logits of every sparse block and their top-1 agreement with the CPU engine's (fp32).
struct Fidelity {
  std::vector<double> logit_rms;  // per sparse block: RMS of (gpu - cpu) over real tokens
  double agreement = 0;
};
Fidelity fidelity_vs_cpu(const SwitchConfig& c, const std::shared_ptr<TensorSource>& src,
                         const Batch& batch, const char* precision) {
  auto cpu = SwitchModel::from_source(c, src, LoadOptions{true});
  RecordingObserver want, got;
  cpu->encode(batch, &want);
  auto gpu = CudaSwitchModel::from_source(c, src, LoadOptions{true},
                                          cuda_options_for_precision(precision));
  gpu->encode(batch, &got);
  Fidelity f;
  int64_t agree = 0, total = 0;
  const int64_t E = c.num_experts;
  for (int blk : c.sparse_encoder_blocks()) {
    const std::string k = "enc." + std::to_string(blk) + ".";
    const auto g = as_f32(got.last(k + "router_logits").view());
    const auto w = as_f32(want.last(k + "router_logits").view());
    const auto ge = as_f32(got.last(k + "expert").view()),
               we = as_f32(want.last(k + "expert").view());
    double sq = 0;
    int64_t n = 0;
    for (size_t t = 0; t < ge.size(); ++t) {
      if (batch.attention_mask[t] == 0) continue;
      agree += ge[t] == we[t];
      ++total;
      for (int64_t e = 0; e < E; ++e, ++n) {
        const double dlt = g[t * E + e] - w[t * E + e];
        sq += dlt * dlt;
      }
    }
    f.logit_rms.push_back(std::sqrt(sq / static_cast<double>(n)));
  }
  f.agreement = static_cast<double>(agree) / static_cast<double>(total);
  return f;
}

// faithful on a shape the fused attention takes (d_kv 64): the first sparse block's logits (before
// any flipped token of an earlier block changes its input) are closer to fp32 than mixed's.
TEST_F(CudaTest, FaithfulLogitsAreCloserToFp32ThanMixed) {
  SwitchConfig c = demo_config();
  c.d_kv = 64;
  c.num_heads = 2;
  c.derive_and_validate("faithful-test");
  auto src = make_hf_init_random_weights(c, RandomWeightOptions{7, DType::kBF16, true});
  const Batch batch = random_batch(8, 90, c.vocab_size, 5);
  const Fidelity mixed = fidelity_vs_cpu(c, src, batch, "mixed");
  const Fidelity faithful = fidelity_vs_cpu(c, src, batch, "faithful");
  ASSERT_FALSE(mixed.logit_rms.empty());
  EXPECT_LT(faithful.logit_rms[0], 0.9 * mixed.logit_rms[0])
      << "faithful " << faithful.logit_rms[0] << ", mixed " << mixed.logit_rms[0];
  EXPECT_GE(faithful.agreement, 0.99);
}

// Where the fused attention does not apply (the demo's d_kv 16), faithful runs the unfused
// attention with a zero low half: the routing of mixed, still within fp32's.
TEST_F(CudaTest, FaithfulWithoutTheFusedAttentionRoutesAsMixed) {
  SwitchConfig c = demo_config();
  auto src = make_hf_init_random_weights(c, RandomWeightOptions{7, DType::kBF16, true});
  const Batch batch = random_batch(8, 90, c.vocab_size, 5);
  const Fidelity mixed = fidelity_vs_cpu(c, src, batch, "mixed");
  const Fidelity faithful = fidelity_vs_cpu(c, src, batch, "faithful");
  EXPECT_GE(faithful.agreement, 0.99);
  ASSERT_EQ(faithful.logit_rms.size(), mixed.logit_rms.size());
  EXPECT_NEAR(faithful.logit_rms[0], mixed.logit_rms[0], 0.05 * mixed.logit_rms[0] + 1e-6);
}

}  // namespace
}  // namespace moetrace::cuda::test
