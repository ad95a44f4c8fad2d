// Helpers shared by the io tests: file bytes, expected-error checks, tensor comparison.
#pragma once

#include <gtest/gtest.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <string>

#include "core/error.h"
#include "io/checkpoint.h"

namespace moetrace::testing {

inline const std::filesystem::path kData = MOETRACE_TEST_DATA;

inline std::string read_bytes(const std::filesystem::path& p) {
  std::ifstream in(p, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

inline void write_bytes(const std::filesystem::path& p, const std::string& bytes) {
  std::ofstream out(p, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

// A fresh, empty folder under the temp dir, removed when the object goes.
class TempDir {
 public:
  explicit TempDir(const std::string& tag) {
    path_ = std::filesystem::temp_directory_path() /
            ("moetrace_io_" + tag + "_" + std::to_string(::getpid()));
    std::filesystem::remove_all(path_);
    std::filesystem::create_directories(path_);
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  const std::filesystem::path& path() const { return path_; }
  std::filesystem::path operator/(const std::string& name) const { return path_ / name; }

 private:
  std::filesystem::path path_;
};

// Runs f, expects a moetrace::Error whose message is one line and contains every needle.
inline void expect_error(const std::function<void()>& f,
                         std::initializer_list<std::string> needles) {
  try {
    f();
    ADD_FAILURE() << "expected moetrace::Error";
  } catch (const Error& e) {
    const std::string msg = e.what();
    EXPECT_EQ(msg.find('\n'), std::string::npos) << msg;
    for (const std::string& n : needles)
      EXPECT_NE(msg.find(n), std::string::npos) << "'" << n << "' not in: " << msg;
  }
}

inline bool same_bytes(const TensorView& a, const TensorView& b) {
  return a.nbytes() == b.nbytes() &&
         (a.nbytes() == 0 || std::memcmp(a.data, b.data, a.nbytes()) == 0);
}

inline void expect_same_tensor(const CheckpointTensor& got, const TensorView& want) {
  EXPECT_EQ(got.view.dtype, want.dtype) << got.name;
  EXPECT_EQ(got.view.shape, want.shape) << got.name;
  EXPECT_TRUE(same_bytes(got.view, want)) << got.name << ": bytes differ";
}

}  // namespace moetrace::testing
