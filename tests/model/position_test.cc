// The relative position bucket (written once, in model/position.h, for both engines) and the bias
// tables the attention ops take.
#include "model/position.h"

#include <gtest/gtest.h>

namespace moetrace {
namespace {

TEST(RelativePositionBucket, DecoderCountsOnlyKeysBehind) {
  EXPECT_EQ(relative_position_bucket(3, false, 32, 128), 0);  // a key ahead: distance 0
  EXPECT_EQ(relative_position_bucket(-5, false, 32, 128), 5);
  EXPECT_EQ(relative_position_bucket(-15, false, 32, 128), 15);
  EXPECT_EQ(relative_position_bucket(-16, false, 32, 128), 16);
  EXPECT_EQ(relative_position_bucket(-1000, false, 32, 128), 31);
}

// Mesh-TF divides the float32 log by float32(log(max_distance / max_exact)) taken in double (a
// Python float). With 36 buckets and max distance 98 (max_exact 18), distance 42 sits exactly on a
// boundary: log(42/18) / log(98/18) = log(7/3) / log(49/9) = 1/2, so the bucket is 18 + 9. A
// float32 log of the constant lands just below and gives 26.
TEST(RelativePositionBucket, LogOfTheConstantIsDoubleAsMeshTf) {
  EXPECT_EQ(relative_position_bucket(-42, false, 36, 98), 27);
}

TEST(PositionBias, EncoderTableByRelativePosition) {
  SwitchConfig c;
  c.relative_attention_num_buckets = 32;
  c.relative_attention_max_distance = 128;
  const int64_t H = 2, S = 20;
  std::vector<float> rel(static_cast<size_t>(32 * H));
  for (size_t i = 0; i < rel.size(); ++i) rel[i] = static_cast<float>(i);  // [bucket, h]
  const auto bias = encoder_position_bias(rel, H, S, c);
  ASSERT_EQ(bias.size(), static_cast<size_t>(H * (2 * S - 1)));
  for (int64_t h = 0; h < H; ++h) {
    for (int64_t rp = -(S - 1); rp < S; ++rp) {
      const int bucket = relative_position_bucket(rp, true, 32, 128);
      EXPECT_EQ(bias[h * (2 * S - 1) + rp + S - 1], rel[bucket * H + h]) << h << " " << rp;
    }
  }
}

TEST(PositionBias, DecoderTableByDistance) {
  SwitchConfig c;
  const int64_t H = 3, n = 40;
  std::vector<float> rel(static_cast<size_t>(c.relative_attention_num_buckets * H));
  for (size_t i = 0; i < rel.size(); ++i) rel[i] = static_cast<float>(i);
  const auto bias = decoder_position_bias(rel, H, n, c);
  ASSERT_EQ(bias.size(), static_cast<size_t>(H * n));
  for (int64_t h = 0; h < H; ++h) {
    for (int64_t a = 0; a < n; ++a) {
      const int bucket = relative_position_bucket(-a, false, c.relative_attention_num_buckets,
                                                  c.relative_attention_max_distance);
      EXPECT_EQ(bias[h * n + a], rel[bucket * H + h]) << h << " " << a;
    }
  }
}

}  // namespace
}  // namespace moetrace
