#include "model/position.h"

#include <algorithm>
#include <cmath>

namespace moetrace {

int relative_position_bucket(int64_t rp, bool bidirectional, int64_t num_buckets,
                             int64_t max_distance) {
  int64_t bucket = 0;
  int64_t nb = num_buckets;
  int64_t a;
  if (bidirectional) {
    nb /= 2;
    if (rp > 0) bucket += nb;
    a = rp < 0 ? -rp : rp;
  } else {
    a = rp < 0 ? -rp : 0;
  }
  const int64_t max_exact = nb / 2;
  if (a < max_exact) return static_cast<int>(bucket + a);
  float v = std::log(static_cast<float>(a) / static_cast<float>(max_exact));
  v = v / static_cast<float>(
              std::log(static_cast<double>(max_distance) / static_cast<double>(max_exact)));
  v = v * static_cast<float>(nb - max_exact);
  const int64_t large = std::min<int64_t>(max_exact + static_cast<int64_t>(v), nb - 1);
  return static_cast<int>(bucket + large);
}

std::vector<float> encoder_position_bias(const std::vector<float>& rel_bias, int64_t H, int64_t S,
                                         const SwitchConfig& c) {
  const int64_t n = 2 * S - 1;
  std::vector<float> bias(static_cast<size_t>(H * n));
  for (int64_t rp = -(S - 1); rp <= S - 1; ++rp) {
    const int bucket = relative_position_bucket(rp, true, c.relative_attention_num_buckets,
                                                c.relative_attention_max_distance);
    for (int64_t h = 0; h < H; ++h)
      bias[static_cast<size_t>(h * n + rp + S - 1)] = rel_bias[bucket * H + h];
  }
  return bias;
}

std::vector<float> decoder_position_bias(const std::vector<float>& rel_bias, int64_t H, int64_t n,
                                         const SwitchConfig& c) {
  std::vector<float> bias(static_cast<size_t>(H * n));
  for (int64_t a = 0; a < n; ++a) {
    const int bucket = relative_position_bucket(-a, false, c.relative_attention_num_buckets,
                                                c.relative_attention_max_distance);
    for (int64_t h = 0; h < H; ++h) bias[static_cast<size_t>(h * n + a)] = rel_bias[bucket * H + h];
  }
  return bias;
}

}  // namespace moetrace
