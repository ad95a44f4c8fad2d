// The one vocabulary of dtype names that options accept (core/dtype.h).
#include <gtest/gtest.h>

#include "core/dtype.h"
#include "core/error.h"

namespace moetrace {
namespace {

TEST(DTypeName, EverySpellingOfTheThreeFloatTypes) {
  const std::pair<const char*, DType> cases[] = {
      {"f32", DType::kF32},     {"fp32", DType::kF32},      {"float32", DType::kF32},
      {"F32", DType::kF32},     {"f16", DType::kF16},       {"fp16", DType::kF16},
      {"float16", DType::kF16}, {"half", DType::kF16},      {"FP16", DType::kF16},
      {"bf16", DType::kBF16},   {"bfloat16", DType::kBF16}, {"BF16", DType::kBF16},
  };
  for (const auto& [name, want] : cases) {
    DType got = DType::kI8;
    EXPECT_TRUE(parse_dtype_name(name, &got)) << name;
    EXPECT_EQ(got, want) << name;
  }
  DType t;
  for (const char* bad : {"", "f8", "int8", "I64", "float", "bf", "fp16 "})
    EXPECT_FALSE(parse_dtype_name(bad, &t)) << bad;
  EXPECT_EQ(dtype_option_name(DType::kF16), "f16");
  EXPECT_EQ(dtype_option_name(DType::kBF16), "bf16");
}

TEST(DTypeName, OptionErrorsListTheAllowedNamesAndTheirAliases) {
  EXPECT_EQ(parse_dtype_option("--precision", "half", {DType::kBF16, DType::kF16}), DType::kF16);
  try {
    parse_dtype_option("--hidden", "fp16", {DType::kBF16, DType::kF32}, {"none"});
    FAIL() << "f16 is not allowed";
  } catch (const Error& e) {
    EXPECT_STREQ(e.what(),
                 "--hidden 'fp16': expected none, bf16 or f32 (also bfloat16, fp32, float32)");
  }
}

}  // namespace
}  // namespace moetrace
