// Helpers of the GPU engine's model tests: tensors as float vectors, the fixtures' batch, random
// right-padded batches.
#pragma once

#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "common/random_batch.h"
#include "core/tensor.h"
#include "io/checkpoint.h"
#include "model/switch_model.h"

namespace moetrace::cuda::test {

inline const std::string kFixtures = std::string(MOETRACE_TEST_DATA) + "/fixtures/";

inline std::vector<float> as_f32(const TensorView& v) {
  std::vector<float> out(static_cast<size_t>(v.numel()));
  if (v.dtype == DType::kI32) {
    for (size_t i = 0; i < out.size(); ++i) out[i] = static_cast<float>(v.as<int32_t>()[i]);
  } else if (v.dtype == DType::kU8) {
    for (size_t i = 0; i < out.size(); ++i) out[i] = v.as<uint8_t>()[i];
  } else if (v.dtype == DType::kI64) {
    for (size_t i = 0; i < out.size(); ++i) out[i] = static_cast<float>(v.as<int64_t>()[i]);
  } else {
    convert_to_f32(v.dtype, v.data, out.data(), out.size());
  }
  return out;
}

inline std::vector<int32_t> as_i32(const TensorView& v) {
  std::vector<int32_t> out;
  for (float x : as_f32(v)) out.push_back(static_cast<int32_t>(x));
  return out;
}

inline Batch fixture_batch(const TensorSource& ref) {
  const TensorView& ids = ref.find("input_ids")->view;
  Batch b;
  b.B = ids.shape[0];
  b.S = ids.shape[1];
  b.input_ids = as_i32(ids);
  b.attention_mask = as_i32(ref.find("attention_mask")->view);
  return b;
}

using moetrace::test::random_batch;  // tests/common/random_batch.h

}  // namespace moetrace::cuda::test
