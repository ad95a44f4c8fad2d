// core/keys.h: the one spelling of observation keys and store tensor names.
#include "core/keys.h"

#include <gtest/gtest.h>

namespace moetrace::keys {
namespace {

TEST(Keys, BuildsLayerAndTensorNames) {
  EXPECT_EQ(layer(Stack::kEncoder, 3), "enc.3");
  EXPECT_EQ(layer(stack_of(true), 11), "dec.11");
  EXPECT_EQ(tensor(Stack::kEncoder, 1, kRouterLogits), "enc.1.router_logits");
  EXPECT_EQ(tensor(Stack::kDecoder, 5, kDropped), "dec.5.dropped");
}

TEST(Keys, ParsesWhatItBuilds) {
  for (std::string_view f : {kInput, kHidden, kRouterLogits, kExpert, kDropped, kGate}) {
    const auto p = parse(tensor(Stack::kDecoder, 7, f));
    ASSERT_TRUE(p.has_value()) << f;
    EXPECT_EQ(p->stack, Stack::kDecoder);
    EXPECT_EQ(p->block, 7);
    EXPECT_EQ(p->field, f);
  }
}

TEST(Keys, RejectsOtherNames) {
  for (std::string_view k : {"enc.output", "token_ids", "dec.input_ids", "enc.x.gate", "enc.3.",
                             "enc..gate", "enc.-1.gate", "xyz.1.gate"}) {
    EXPECT_FALSE(parse(k).has_value()) << k;
  }
}

TEST(Keys, LanguageModelStacks) {
  EXPECT_EQ(layer(stack_of(false, true), 3), "lm.3");
  EXPECT_EQ(tensor(stack_of(true, true), 5, kExpert), "gen.5.expert");
  EXPECT_EQ(layer(stack_of(true, false), 5), "dec.5");  // Switch is unchanged
  const auto p = parse("gen.7.router_topk_ids");
  ASSERT_TRUE(p.has_value());
  EXPECT_EQ(p->stack, Stack::kGen);
  EXPECT_EQ(p->block, 7);
  EXPECT_EQ(p->field, kRouterTopkIds);
  EXPECT_EQ(parse("lm.0.gate")->stack, Stack::kLm);
  for (std::string_view k : {"lm.output", "lmx.1.gate", "gen..gate", "gen.1.", "l.1.gate"}) {
    EXPECT_FALSE(parse(k).has_value()) << k;
  }
}

}  // namespace
}  // namespace moetrace::keys
