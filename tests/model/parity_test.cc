// The CPU engine against the transformers 4.x reference outputs of the fixtures, for every
// checkpoint format: hidden states, router logits and LM logits within 1e-4 relative, top1/kept and
// generated ids identical.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>

#include "io/checkpoint.h"
#include "io/safetensors.h"
#include "model/forward.h"

namespace moetrace {
namespace {

namespace fs = std::filesystem;
const fs::path kFixtures = fs::path(MOETRACE_TEST_DATA) / "fixtures";

double rel_error(const TensorView& a, const TensorView& b) {
  double num = 0, den = 0;
  for (int64_t i = 0; i < b.numel(); ++i) {
    const double x = a.as<float>()[i], y = b.as<float>()[i];
    num += (x - y) * (x - y);
    den += y * y;
  }
  return std::sqrt(num) / std::max(std::sqrt(den), 1e-30);
}

struct Case {
  const char* fixture;
  const char* checkpoint;  // file or index inside model/
};

class Parity : public ::testing::TestWithParam<Case> {};

TEST_P(Parity, MatchesReference) {
  const Case c = GetParam();
  const fs::path dir = kFixtures / c.fixture;
  const fs::path ref_path = dir / "reference.safetensors";
  SafetensorsFile ref = SafetensorsFile::open(ref_path);
  ForwardInputs in = read_forward_inputs(ref_path);
  SwitchConfig config = load_config(dir / "model/config.json");
  auto model = SwitchModel::from_source(config, open_checkpoint(dir / "model" / c.checkpoint),
                                        LoadOptions{});
  const int64_t gen = ref.find("generated_ids")->view.shape[1] - 1;
  auto out = run_forward(*model, in, gen);

  int compared = 0;
  for (const NamedView& r : ref.tensors()) {
    if (r.name == "input_ids" || r.name == "attention_mask" || r.name == "decoder_input_ids")
      continue;
    ASSERT_TRUE(out.count(r.name)) << "missing output " << r.name;
    const Tensor& o = out.at(r.name);
    ASSERT_EQ(o.shape(), r.view.shape) << r.name;
    ASSERT_EQ(o.dtype(), r.view.dtype) << r.name;
    if (r.view.dtype == DType::kF32) {
      EXPECT_LT(rel_error(o.view(), r.view), 1e-4) << r.name;
    } else {
      int64_t diff = 0;
      for (int64_t i = 0; i < o.numel(); ++i)
        diff += o.data<int32_t>()[i] != r.view.as<int32_t>()[i];
      EXPECT_EQ(diff, 0) << r.name << ": " << diff << " of " << o.numel() << " differ";
    }
    ++compared;
  }
  EXPECT_GT(compared, 30);
}

INSTANTIATE_TEST_SUITE_P(Fixtures, Parity,
                         ::testing::Values(Case{"tiny-a", "model.safetensors"},
                                           Case{"tiny-a", "pytorch_model.bin"},
                                           Case{"tiny-a-bf16", "model.safetensors"},
                                           Case{"tiny-a-bf16", "pytorch_model.bin.index.json"}),
                         [](const auto& info) {
                           std::string n =
                               std::string(info.param.fixture) + "_" + info.param.checkpoint;
                           for (char& ch : n) {
                             if (!std::isalnum(static_cast<unsigned char>(ch))) ch = '_';
                           }
                           return n;
                         });

TEST(RelativePositionBucket, EncoderTableFromSpec) {
  // |rp| 0-7 -> itself, 8-11 -> 8, 12-15 -> 9, 16-22 -> 10, 23-31 -> 11, 32-45 -> 12, 46-63 -> 13,
  // 64-90 -> 14, >= 91 -> 15 (+16 when rp > 0).
  const std::pair<int, int> expect[] = {
      {0, 0},   {7, 7},   {8, 8},   {11, 8},  {12, 9},  {15, 9},  {16, 10}, {22, 10}, {23, 11},
      {31, 11}, {32, 12}, {45, 12}, {46, 13}, {63, 13}, {64, 14}, {90, 14}, {91, 15}, {500, 15}};
  for (auto [a, bucket] : expect) {
    EXPECT_EQ(relative_position_bucket(-a, true, 32, 128), bucket) << a;
    if (a > 0) {
      EXPECT_EQ(relative_position_bucket(a, true, 32, 128), bucket + 16) << a;
    }
  }
}

}  // namespace
}  // namespace moetrace
