// The --precision vocabulary (core/dtype.h parse_precision_option): the three GEMM dtypes in every
// spelling, plus "mixed" and "faithful".
#include <gtest/gtest.h>

#include "core/dtype.h"
#include "core/error.h"

namespace moetrace {
namespace {

TEST(PrecisionOption, DtypeSpellingsAndMixed) {
  const std::pair<const char*, const char*> cases[] = {
      {"bf16", "bf16"},         {"bfloat16", "bf16"},     {"BF16", "bf16"},   {"f16", "fp16"},
      {"half", "fp16"},         {"fp16", "fp16"},         {"f32", "fp32"},    {"float32", "fp32"},
      {"fp32", "fp32"},         {"mixed", "mixed"},       {"MIXED", "mixed"}, {"Mixed", "mixed"},
      {"faithful", "faithful"}, {"Faithful", "faithful"},
  };
  for (const auto& [value, want] : cases)
    EXPECT_EQ(parse_precision_option("--precision", value), want) << value;
}

TEST(PrecisionOption, OtherWordsAreOneLineNamingTheOptionAndMixed) {
  for (const char* bad : {"int4", "", "mixed ", "f64", "mix"}) {
    try {
      parse_precision_option("--precision", bad);
      FAIL() << bad;
    } catch (const Error& e) {
      const std::string msg = e.what();
      EXPECT_EQ(msg.rfind(std::string("--precision '") + bad + "': expected bf16, f16 or f32", 0),
                0u)
          << msg;
      EXPECT_NE(msg.find("or mixed"), std::string::npos) << msg;
      EXPECT_NE(msg.find("faithful"), std::string::npos) << msg;
      EXPECT_EQ(msg.find('\n'), std::string::npos) << msg;
    }
  }
}

TEST(PrecisionMode, OneMappingOfEveryName) {
  EXPECT_EQ(precision_mode("fp32").operands, DType::kF32);
  EXPECT_EQ(precision_mode("bf16").operands, DType::kBF16);
  EXPECT_EQ(precision_mode("fp16").operands, DType::kF16);
  for (const char* n : {"fp32", "bf16", "fp16"}) EXPECT_FALSE(precision_mode(n).fp32_routing) << n;
  // mixed: fp16 operands (11-bit significands) with the routing decided on fp32 probabilities.
  EXPECT_EQ(precision_mode("mixed").operands, DType::kF16);
  EXPECT_TRUE(precision_mode("mixed").fp32_routing);
  for (const char* n : {"fp32", "bf16", "fp16", "mixed"})
    EXPECT_FALSE(precision_mode(n).attention_pairs) << n;
  // faithful: mixed with the encoder attention's probabilities and output as fp16 pairs.
  EXPECT_EQ(precision_mode("faithful").operands, DType::kF16);
  EXPECT_TRUE(precision_mode("faithful").fp32_routing);
  EXPECT_TRUE(precision_mode("faithful").attention_pairs);
  EXPECT_THROW(precision_mode("f32"), Error);  // callers pass parse_precision_option's spelling
  try {
    precision_mode("int8", "--precision");
    FAIL() << "int8";
  } catch (const Error& e) {
    EXPECT_STREQ(e.what(), "--precision 'int8': expected bf16, fp16, fp32, mixed or faithful");
  }
}

}  // namespace
}  // namespace moetrace
