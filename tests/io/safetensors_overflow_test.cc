// Sizes in a safetensors header whose byte count wraps 64 bits (issue 15 item 9, C++ side): a
// [2^31, 2^31] F64 tensor needs 2^65 bytes, which wrapped to 0 and matched empty data_offsets.
#include <gtest/gtest.h>

#include "io/io_test_util.h"
#include "io/safetensors.h"

namespace moetrace {
namespace {

std::string with_header(const std::string& header, size_t data_bytes) {
  const uint64_t n = header.size();
  return std::string(reinterpret_cast<const char*>(&n), 8) + header + std::string(data_bytes, '\0');
}

TEST(SafetensorsOverflow, ByteCountThatWrapsIsRefused) {
  testing::TempDir tmp("st_overflow");
  const auto p = tmp / "wrap.safetensors";
  testing::write_bytes(
      p, with_header(
             R"({"t":{"dtype":"F64","shape":[2147483648,2147483648],"data_offsets":[0,0]}})", 0));
  testing::expect_error([&] { SafetensorsFile::open(p); },
                        {"wrap.safetensors", "'t'", "too large"});
}

TEST(SafetensorsOverflow, OverlappingTensorsAreRefused) {
  testing::TempDir tmp("st_overlap");
  const auto p = tmp / "overlap.safetensors";
  testing::write_bytes(p, with_header(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                                      R"("b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
                                      12));
  testing::expect_error([&] { SafetensorsFile::open(p); }, {"overlap.safetensors", "overlapping"});
}

}  // namespace
}  // namespace moetrace
