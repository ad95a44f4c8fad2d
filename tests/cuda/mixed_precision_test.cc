// Precision "mixed" (fp16 GEMM operands, routing decided in fp32): the decision and gate come from
// the float32 probabilities of the very logits the engine observed, where bf16/fp16 round them first.
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

}  // namespace
}  // namespace moetrace::cuda::test
