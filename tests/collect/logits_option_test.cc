// collect's one parser of --logits: a dtype (f32 | f16 | bf16 and their aliases) or topk:K.
#include <gtest/gtest.h>

#include <string>

#include "collect/collect.h"
#include "core/error.h"

namespace moetrace {
namespace {

std::string error_of(std::string_view value) {
  try {
    parse_logits_option(value);
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

TEST(LogitsOption, DtypesAndTopk) {
  EXPECT_EQ(parse_logits_option("f16").dtype, DType::kF16);
  EXPECT_EQ(parse_logits_option("f16").topk, 0);
  EXPECT_EQ(parse_logits_option("bfloat16").dtype, DType::kBF16);
  EXPECT_EQ(parse_logits_option("fp32").dtype, DType::kF32);
  const LogitsOption t = parse_logits_option("topk:8");
  EXPECT_EQ(t.topk, 8);
  EXPECT_EQ(t.dtype, DType::kF16);  // the top-K values' dtype
  EXPECT_EQ(parse_logits_option("TopK:1").topk, 1);
}

TEST(LogitsOption, ErrorsNameTheValue) {
  for (const char* bad : {"topk:", "topk:0", "topk:-2", "topk:3x", "topk:99999999999"}) {
    EXPECT_NE(error_of(bad).find(std::string("--logits '") + bad + "': topk:K needs"),
              std::string::npos)
        << bad << ": " << error_of(bad);
  }
  const std::string e = error_of("f8");
  EXPECT_NE(e.find("--logits 'f8': expected f32, f16 or bf16"), std::string::npos) << e;
  EXPECT_NE(e.find("or topk:K"), std::string::npos) << e;
}

}  // namespace
}  // namespace moetrace
