// The Engine interface on the GPU (make_engine({cuda:0})) against the CPU engine, through the
// collection pipeline as collect drives it: encoder-only batches through the asynchronous slots,
// then batches with generation (computed at submit, decoder keys stacked over the steps). Skipped
// where no GPU is visible (scripts/gpu_check.sh runs it on one).
#include <gtest/gtest.h>

#include <cmath>
#include <random>

#include "common/random_batch.h"
#include "core/keys.h"
#include "engine/engine.h"
#include "model/random_weights.h"

namespace moetrace {
namespace {

using test::random_batch;  // tests/common/random_batch.h

// F32, I32 or U8 (what this request gets back) as floats.
std::vector<float> f32_of(const TensorView& v) {
  EXPECT_TRUE(v.dtype == DType::kF32 || v.dtype == DType::kI32 || v.dtype == DType::kU8);
  std::vector<float> out(static_cast<size_t>(v.numel()));
  for (size_t i = 0; i < out.size(); ++i) {
    out[i] = v.dtype == DType::kF32   ? v.as<float>()[i]
             : v.dtype == DType::kI32 ? static_cast<float>(v.as<int32_t>()[i])
                                      : static_cast<float>(v.as<uint8_t>()[i]);
  }
  return out;
}

double rel_err(const std::vector<float>& a, const std::vector<float>& b) {
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    num += (double{a[i]} - b[i]) * (double{a[i]} - b[i]);
    den += double{b[i]} * b[i];
  }
  return std::sqrt(num) / std::max(std::sqrt(den), 1e-30);
}

TEST(CudaEngine, PipelineMatchesTheCpuEngine) {
  if (!built_with_cuda() || visible_cuda_devices() < 1) GTEST_SKIP() << "no CUDA device";
  SwitchConfig c = demo_config();
  auto src = make_random_weights(c, RandomWeightOptions{7, DType::kF32, false});
  EngineOptions co, go;
  co.load.encoder_only = go.load.encoder_only = false;
  go.device = resolve_device("cuda:0", 0);
  go.precision = DType::kF32;
  auto cpu = make_engine(co, c, src);
  auto gpu = make_engine(go, c, src);
  EXPECT_EQ(gpu->device(), "cuda:0");
  KeyRequest request;  // F32 logits: comparable with the CPU's
  for (int i : c.sparse_encoder_blocks())
    for (std::string_view f : {keys::kRouterLogits, keys::kExpert, keys::kDropped, keys::kGate})
      request.add(keys::tensor(keys::Stack::kEncoder, i, f), DType::kF32);
  for (int i : c.sparse_decoder_blocks())
    for (std::string_view f : {keys::kRouterLogits, keys::kExpert})
      request.add(keys::tensor(keys::Stack::kDecoder, i, f));

  std::vector<Batch> batches;
  for (int i = 0; i < 6; ++i)
    batches.push_back(random_batch(2 + i, 9 + 5 * i, c.vocab_size, 30 + i));
  // Each finished batch is compared and released as soon as it is polled: a CapturedBatch holds
  // its pinned slot, and submit() waits for a free one (holding all six would wait forever).
  for (int64_t steps : {int64_t{0}, int64_t{4}}) {
    const uint64_t first = steps == 0 ? 0 : batches.size();
    size_t compared = 0;
    const auto check = [&](std::unique_ptr<CapturedBatch> got) {
      ASSERT_NE(got, nullptr);
      const size_t j = compared++;
      ASSERT_LT(j, batches.size());
      EXPECT_EQ(got->ticket, first + j);
      cpu->submit(batches[j], request, steps);
      auto want = cpu->poll(true);
      ASSERT_EQ(got->tensors.size(), want->tensors.size()) << "steps " << steps;
      for (const auto& [key, w] : want->tensors) {
        const TensorView* g = got->find(key);
        ASSERT_NE(g, nullptr) << key;
        ASSERT_EQ(g->shape, w.shape) << key;
        const auto a = f32_of(*g), b = f32_of(w);
        if (key.find(keys::kRouterLogits) != std::string::npos) {
          EXPECT_LT(rel_err(a, b), 1e-3) << key;
        } else if (key.find(keys::kExpert) != std::string::npos) {
          size_t same = 0;
          for (size_t i = 0; i < a.size(); ++i) same += a[i] == b[i];
          EXPECT_GE(static_cast<double>(same), 0.99 * static_cast<double>(a.size())) << key;
        }
      }
      EXPECT_EQ(got->generated.steps > 0, steps > 0);
      EXPECT_EQ(got->generated.B, want->generated.B);
    };
    for (const Batch& b : batches) {
      if (gpu->in_flight() == gpu->slots()) check(gpu->poll(true));
      gpu->submit(b, request, steps);
    }
    while (auto r = gpu->poll(true)) check(std::move(r));
    EXPECT_EQ(compared, batches.size());
  }
}

}  // namespace
}  // namespace moetrace
