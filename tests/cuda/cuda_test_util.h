// Helpers of the GPU tests: a fixture that skips without a GPU, random data, device round trips.
#pragma once

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "core/dtype.h"
#include "kernels/cuda/common.h"

namespace moetrace::cuda::test {

class CudaTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!device_available()) GTEST_SKIP() << "no CUDA device";
  }
};

inline std::vector<float> random_vec(size_t n, uint64_t seed, float lo = -1.f, float hi = 1.f) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> u(lo, hi);
  std::vector<float> v(n);
  for (auto& x : v) x = u(rng);
  return v;
}

// Rounds every element to dtype t in place (so CPU and GPU see the same operands).
inline void round_vec(std::vector<float>& v, DType t) {
  for (auto& x : v) x = round_to(x, t);
}

// Uploads v as dtype t (F32, BF16, F16).
inline DeviceBuffer to_device(const std::vector<float>& v, DType t) {
  DeviceBuffer buf(std::max<size_t>(1, v.size() * act_size(t)));
  std::vector<uint8_t> host(v.size() * act_size(t));
  convert_from_f32(v.data(), t, host.data(), v.size());
  upload(buf.get(), host.data(), host.size());
  return buf;
}
template <class T>
DeviceBuffer to_device_raw(const std::vector<T>& v) {
  DeviceBuffer buf(std::max<size_t>(1, v.size() * sizeof(T)));
  upload(buf.get(), v.data(), v.size() * sizeof(T));
  return buf;
}
// The kernels run on non-blocking streams, which the legacy default stream does not wait for: the
// downloads below synchronize the device first.
inline std::vector<float> from_device(const DeviceBuffer& buf, size_t n, DType t) {
  MT_CUDA_CHECK(cudaDeviceSynchronize());
  std::vector<uint8_t> host(n * act_size(t));
  download(host.data(), buf.get(), host.size());
  std::vector<float> out(n);
  convert_to_f32(t, host.data(), out.data(), n);
  return out;
}
template <class T>
std::vector<T> from_device_raw(const DeviceBuffer& buf, size_t n) {
  MT_CUDA_CHECK(cudaDeviceSynchronize());
  std::vector<T> out(n);
  download(out.data(), buf.get(), n * sizeof(T));
  return out;
}

// ‖a - b‖ / ‖b‖; NaN never passes.
inline double rel_err(const std::vector<float>& a, const std::vector<float>& b) {
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    if (std::isnan(a[i])) return INFINITY;
    num += (static_cast<double>(a[i]) - b[i]) * (static_cast<double>(a[i]) - b[i]);
    den += static_cast<double>(b[i]) * b[i];
  }
  return std::sqrt(num / std::max(den, 1e-300));
}

}  // namespace moetrace::cuda::test
