// Malformed safetensors files: one-line Errors naming the file and the tensor.
#include <gtest/gtest.h>

#include <cstdint>

#include "io/io_test_util.h"
#include "io/safetensors.h"

namespace moetrace {
namespace {

namespace fs = std::filesystem;
using testing::expect_error;

std::string with_header(const std::string& header, size_t data_bytes) {
  const uint64_t n = header.size();
  return std::string(reinterpret_cast<const char*>(&n), 8) + header + std::string(data_bytes, '\0');
}

TEST(SafetensorsErrors, TruncatedFile) {
  const std::string bytes =
      testing::read_bytes(testing::kData / "fixtures/tiny-a/model/model.safetensors");
  testing::TempDir tmp("st_trunc");
  const fs::path p = tmp / "t.safetensors";
  for (size_t n :
       {size_t{0}, size_t{5}, size_t{8}, size_t{100}, bytes.size() / 2, bytes.size() - 1}) {
    testing::write_bytes(p, bytes.substr(0, n));
    expect_error([&] { SafetensorsFile::open(p); }, {p.string()});
  }
  // Cut inside the data region: the message names a tensor whose data is gone.
  testing::write_bytes(p, bytes.substr(0, bytes.size() - 1));
  expect_error([&] { SafetensorsFile::open(p); }, {"tensor '", "pass the end"});
}

TEST(SafetensorsErrors, HeaderProblems) {
  testing::TempDir tmp("st_header");
  const fs::path p = tmp / "h.safetensors";
  auto check = [&](const std::string& header, size_t data,
                   std::initializer_list<std::string> needles) {
    testing::write_bytes(p, with_header(header, data));
    std::vector<std::string> all(needles);
    all.push_back(p.string());
    try {
      SafetensorsFile::open(p);
      ADD_FAILURE() << "no error for " << header;
    } catch (const Error& e) {
      const std::string msg = e.what();
      EXPECT_EQ(msg.find('\n'), std::string::npos);
      for (const auto& n : all) EXPECT_NE(msg.find(n), std::string::npos) << n << " not in " << msg;
    }
  };
  check(R"({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}})", 8,
        {"tensor 'w'", "pass the end"});
  check(R"({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
            "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}})",
        24, {"'a'", "'b'", "overlapping"});
  check(R"({"w": {"dtype": "F12", "shape": [1], "data_offsets": [0, 4]}})", 4,
        {"tensor 'w'", "unknown dtype"});
  check(R"({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 16]}})", 16,
        {"tensor 'w'", "needs 12 bytes"});
  check(R"({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}})", 4,
        {"tensor 'w'", "shape"});
  check(R"({"w": )", 4, {"not valid JSON"});
  check(R"([1, 2])", 4, {"JSON object"});
  // A header length that passes the end of the file.
  testing::write_bytes(p, std::string("\xff\xff\xff\xff\x00\x00\x00\x00{}", 10));
  expect_error([&] { SafetensorsFile::open(p); }, {p.string(), "header length"});
}

}  // namespace
}  // namespace moetrace
