#include "io/safetensors.h"

#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

#include "core/error.h"
#include "io/checkpoint.h"

namespace moetrace {
namespace {

namespace fs = std::filesystem;
const fs::path kData = MOETRACE_TEST_DATA;

TEST(Safetensors, ReadsFixtureModel) {
  auto f = SafetensorsFile::open(kData / "fixtures/tiny-a/model/model.safetensors");
  const NamedView* t = f.find("encoder.block.1.layer.1.mlp.router.classifier.weight");
  ASSERT_NE(t, nullptr);
  EXPECT_EQ(t->view.dtype, DType::kF32);
  EXPECT_EQ(t->view.shape, (Shape{8, 32}));
}

TEST(Safetensors, WriteReadRoundTrip) {
  const fs::path p = fs::temp_directory_path() / "mt_st_roundtrip.safetensors";
  Tensor a(DType::kF32, {2, 3});
  for (int i = 0; i < 6; ++i) a.data<float>()[i] = static_cast<float>(i) * 0.5f;
  Tensor b(DType::kI32, {4});
  for (int i = 0; i < 4; ++i) b.data<int32_t>()[i] = -i;
  write_safetensors(p, {{"b", b.view()}, {"a", a.view()}}, {{"k", "v"}});
  auto f = SafetensorsFile::open(p);
  ASSERT_NE(f.find("a"), nullptr);
  EXPECT_EQ(f.find("a")->view.shape, (Shape{2, 3}));
  EXPECT_EQ(f.find("a")->view.as<float>()[5], 2.5f);
  EXPECT_EQ(f.find("b")->view.as<int32_t>()[3], -3);
  EXPECT_EQ(f.metadata().at("k"), "v");
  fs::remove(p);
}

}  // namespace
}  // namespace moetrace
