// model/random_weights.h: the published Switch shapes that `--model random:NAME` builds.
#include <gtest/gtest.h>

#include "model/random_weights.h"

namespace moetrace {
namespace {

TEST(PublishedConfig, SwitchBaseShapes) {
  for (int64_t e : {8, 16, 32, 64, 128, 256}) {
    const auto c = published_config("switch-base-" + std::to_string(e));
    ASSERT_TRUE(c.has_value()) << e;
    EXPECT_EQ(c->num_experts, e);
    EXPECT_EQ(c->d_model, 768);
    EXPECT_EQ(c->d_ff, 3072);
    EXPECT_EQ(c->num_heads, 12);
    EXPECT_EQ(c->num_layers, 12);
    EXPECT_TRUE(c->encoder_block_sparse(1));
    EXPECT_FALSE(c->encoder_block_sparse(2));
  }
}

TEST(PublishedConfig, SwitchLarge128) {
  const auto c = published_config("switch-large-128");
  ASSERT_TRUE(c.has_value());
  EXPECT_EQ(c->d_model, 1024);
  EXPECT_EQ(c->d_ff, 4096);
  EXPECT_EQ(c->d_kv, 64);
  EXPECT_EQ(c->num_heads, 16);
  EXPECT_EQ(c->num_layers, 24);
  EXPECT_EQ(c->num_decoder_layers, 24);
  EXPECT_EQ(c->num_experts, 128);
  int sparse = 0;
  for (int64_t i = 0; i < c->num_layers; ++i) sparse += c->encoder_block_sparse(i) ? 1 : 0;
  EXPECT_EQ(sparse, 12);  // blocks 1, 3, ..., 23
  EXPECT_TRUE(c->encoder_block_sparse(23));
}

TEST(PublishedConfig, RejectsOtherNames) {
  for (const char* name : {"switch-base-", "switch-base-0", "switch-base-12x", "switch-huge-8",
                           "switch-large--1", "switch-base-5000", "t5-base"}) {
    EXPECT_FALSE(published_config(name).has_value()) << name;
  }
}

}  // namespace
}  // namespace moetrace
