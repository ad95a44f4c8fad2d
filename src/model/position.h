// The relative position bias of the Switch (T5) attention: the bucket rule of SWITCH_SPEC.md, once,
// for both engines, and the bias tables the attention ops take.
#pragma once

#include <cstdint>
#include <vector>

#include "model/config.h"

namespace moetrace {

// Relative position bucket (Mesh-TF _relative_position_bucket) of rp = key_pos - query_pos:
// bidirectional (encoder) buckets split by sign; otherwise (decoder) only keys behind the query
// count. The log is float32 of float32 operands divided by the float32 of Mesh-TF's Python-double
// log(max_distance / max_exact); the result truncates toward zero.
int relative_position_bucket(int64_t rp, bool bidirectional, int64_t num_buckets,
                             int64_t max_distance);

// Encoder bias by relative position, the attention ops' layout: [H, 2S-1], entry (h, rp + S - 1)
// for rp = key - query in (-S, S). rel_bias: the checkpoint's table [num_buckets, H].
std::vector<float> encoder_position_bias(const std::vector<float>& rel_bias, int64_t H, int64_t S,
                                         const SwitchConfig& c);

// Decoder bias by distance behind the query, decode_attention's layout: [H, n], entry (h, a) for
// a key a = 0 .. n-1 positions behind its query.
std::vector<float> decoder_position_bias(const std::vector<float>& rel_bias, int64_t H, int64_t n,
                                         const SwitchConfig& c);

}  // namespace moetrace
