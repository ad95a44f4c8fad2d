// The LM CPU engine against the transformers 5.25 reference of tests/data/fixtures_lm/<family>/
// (made by scripts/make_lm_fixtures.py): every reference key, for each checkpoint layout (model/:
// save_pretrained's per-expert names, model_hub/: the Hub's names in 2 shards with the older
// config spelling, model_fused/: the fused 3-D experts), F32 within 1e-4 relative, ids identical.
// Also: a BF16 checkpoint gives exactly what the F32 checkpoint of the same (rounded) values does.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "io/checkpoint.h"
#include "io/safetensors.h"
#include "model/lm/lm_forward.h"

namespace moetrace {
namespace {

namespace fs = std::filesystem;
const fs::path kFixtures = fs::path(MOETRACE_TEST_DATA) / "fixtures_lm";

double rel_error(const TensorView& a, const TensorView& b) {
  double num = 0, den = 0;
  for (int64_t i = 0; i < b.numel(); ++i) {
    const double x = a.as<float>()[i], y = b.as<float>()[i];
    num += (x - y) * (x - y);
    den += y * y;
  }
  return std::sqrt(num) / std::max(std::sqrt(den), 1e-30);
}

int64_t as_int(const TensorView& v, int64_t i) {
  return v.dtype == DType::kI64 ? v.as<int64_t>()[i] : v.as<int32_t>()[i];
}

int64_t new_tokens(const fs::path& dir) {
  std::ifstream in(dir / "meta.json");
  return nlohmann::json::parse(in).at("generate_new_tokens").get<int64_t>();
}

struct Case {
  const char* family;
  const char* layout;
};

class LmParity : public ::testing::TestWithParam<Case> {};

TEST_P(LmParity, MatchesReference) {
  const Case c = GetParam();
  const fs::path dir = kFixtures / c.family;
  ASSERT_TRUE(fs::exists(dir / "reference.safetensors"))
      << dir << ": the LM fixtures are missing (scripts/make_lm_fixtures.py makes them)";
  SafetensorsFile ref = SafetensorsFile::open(dir / "reference.safetensors");
  const ForwardInputs in = read_forward_inputs(dir / "inputs.safetensors");
  const auto model = LmModel::load(dir / c.layout);
  const auto out = run_lm_forward(*model, in, new_tokens(dir));

  int compared = 0;
  for (const NamedView& r : ref.tensors()) {
    ASSERT_TRUE(out.count(r.name)) << "missing output " << r.name;
    const Tensor& o = out.at(r.name);
    ASSERT_EQ(o.shape(), r.view.shape) << r.name;
    ASSERT_EQ(o.dtype(), r.view.dtype) << r.name;
    if (r.view.dtype == DType::kF32) {
      EXPECT_LT(rel_error(o.view(), r.view), 1e-4) << r.name;
    } else {
      int64_t diff = 0;
      for (int64_t i = 0; i < o.numel(); ++i) diff += as_int(o.view(), i) != as_int(r.view, i);
      EXPECT_EQ(diff, 0) << r.name << ": " << diff << " of " << o.numel() << " differ";
    }
    ++compared;
  }
  // 4 router keys per MoE layer twice (prompt, generation), logits, ids, positions.
  EXPECT_EQ(compared, 8 * static_cast<int>(model->config().sparse_layers().size()) + 3);
  EXPECT_EQ(out.size(), static_cast<size_t>(compared)) << "outputs the reference does not have";
}

std::vector<Case> cases() {
  std::vector<Case> out;
  for (const char* f : {"olmoe", "mixtral", "qwen2_moe", "qwen3_moe"}) {
    for (const char* l : {"model", "model_hub", "model_fused"}) out.push_back({f, l});
  }
  return out;
}

INSTANTIATE_TEST_SUITE_P(Fixtures, LmParity, ::testing::ValuesIn(cases()), [](const auto& info) {
  return std::string(info.param.family) + "_" + info.param.layout;
});

// Every tensor of `base` converted to `dtype` (F32 sources: BF16 rounds; BF16 -> F32 is exact).
class ConvertedSource : public MapTensorSource {
 public:
  ConvertedSource(const TensorSource& base, bool bf16) : files_(base.files()) {
    for (const std::string& n : base.names()) {
      const CheckpointTensor* t = base.find(n);
      std::vector<float> f32(static_cast<size_t>(t->view.numel()));
      convert_to_f32(t->view.dtype, t->view.data, f32.data(), f32.size());
      for (float& v : f32) v = bf16_to_f32(f32_to_bf16(v));  // the rounded values in both
      const DType dt = bf16 ? DType::kBF16 : DType::kF32;
      owned_.push_back(std::make_unique<Tensor>(dt, t->view.shape));
      convert_from_f32(f32.data(), dt, owned_.back()->raw(), f32.size());
      by_name_[n] = CheckpointTensor{n, owned_.back()->view(), t->file};
    }
  }
  std::vector<fs::path> files() const override { return files_; }
  std::string format() const override { return "converted"; }

 private:
  std::vector<fs::path> files_;
  std::vector<std::unique_ptr<Tensor>> owned_;
};

TEST(LmBf16, Bf16CheckpointEqualsF32OfTheSameValues) {
  const fs::path dir = kFixtures / "qwen2_moe";
  const auto base = open_checkpoint(dir / "model_hub");
  const LmConfig config = load_lm_config(dir / "model_hub/config.json");
  const ForwardInputs in = read_forward_inputs(dir / "inputs.safetensors");
  std::map<std::string, Tensor> outs[2];
  for (int bf16 = 0; bf16 < 2; ++bf16) {
    auto src = std::make_shared<ConvertedSource>(*base, bf16 == 1);
    EXPECT_EQ(src->find("model.embed_tokens.weight")->view.dtype,
              bf16 ? DType::kBF16 : DType::kF32);
    outs[bf16] = run_lm_forward(*LmModel::from_source(config, src), in, 3);
  }
  ASSERT_EQ(outs[0].size(), outs[1].size());
  for (const auto& [name, t] : outs[0]) {
    const Tensor& u = outs[1].at(name);
    ASSERT_EQ(t.shape(), u.shape()) << name;
    EXPECT_EQ(std::memcmp(t.raw(), u.raw(), t.nbytes()), 0) << name << " differs";
  }
  // ... and the rounding changed something, so the BF16 path was not just the F32 one.
  const auto f32 = run_lm_forward(*LmModel::load(dir / "model_hub"), in, 3);
  EXPECT_GT(rel_error(f32.at("logits").view(), outs[0].at("logits").view()), 1e-5);
}

}  // namespace
}  // namespace moetrace
