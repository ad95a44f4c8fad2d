// A cache's refs/<branch> file names a snapshot folder; one holding a path ("../../../elsewhere",
// "/abs") must neither load a model from outside the cache nor be listed (issue 15 item 11).
#include <gtest/gtest.h>

#include <cstdlib>

#include "io/hf_cache.h"
#include "io/io_test_util.h"

namespace moetrace {
namespace {

namespace fs = std::filesystem;
using testing::expect_error;

class HfCacheRefs : public ::testing::Test {
 protected:
  HfCacheRefs() : tmp_("hf_cache_refs"), cache_(tmp_ / "hub") {
    const char* old = std::getenv("HF_HUB_CACHE");
    had_ = old != nullptr;
    if (had_) old_ = old;
    ::setenv("HF_HUB_CACHE", cache_.c_str(), 1);
    // A model folder outside the cache that a hostile ref points at.
    fs::create_directories(tmp_ / "elsewhere");
    testing::write_bytes(tmp_ / "elsewhere/config.json", "{}");
    testing::write_bytes(tmp_ / "elsewhere/model.safetensors", "");
  }
  ~HfCacheRefs() override {
    if (had_) {
      ::setenv("HF_HUB_CACHE", old_.c_str(), 1);
    } else {
      ::unsetenv("HF_HUB_CACHE");
    }
  }
  // models--evil--m with one ordinary snapshot and refs/main holding `ref`.
  void add_evil(const std::string& ref) {
    const fs::path repo = cache_ / "models--evil--m";
    fs::create_directories(repo / "snapshots/abc123");
    testing::write_bytes(repo / "snapshots/abc123/config.json", "{}");
    testing::write_bytes(repo / "snapshots/abc123/model.safetensors", "");
    fs::create_directories(repo / "refs");
    testing::write_bytes(repo / "refs/main", ref + "\n");
  }
  testing::TempDir tmp_;
  fs::path cache_;
  bool had_ = false;
  std::string old_;
};

TEST_F(HfCacheRefs, RelativePathInRefIsRefused) {
  add_evil("../../../elsewhere");
  ASSERT_TRUE(fs::is_directory(cache_ / "models--evil--m/snapshots/../../../elsewhere"));
  expect_error([] { resolve_model("evil/m"); }, {"evil/m", "refs/main", "not a revision name"});
  EXPECT_TRUE(list_cached_models("").empty());
}

TEST_F(HfCacheRefs, AbsolutePathInRefIsRefused) {
  add_evil((tmp_ / "elsewhere").string());
  expect_error([] { resolve_model("evil/m"); }, {"evil/m", "not a revision name"});
  EXPECT_TRUE(list_cached_models("").empty());
}

TEST_F(HfCacheRefs, OtherNonNamesAreRefused) {
  for (const char* ref : {"..", ".", "abc123/../abc123", "abc 123"}) {
    add_evil(ref);
    expect_error([] { resolve_model("evil/m"); }, {"evil/m", "not a revision name"});
    EXPECT_TRUE(list_cached_models("").empty()) << ref;
  }
}

TEST_F(HfCacheRefs, PlainRevisionStillResolves) {
  add_evil("abc123");
  const ResolvedModel m = resolve_model("evil/m");
  EXPECT_EQ(m.dir, cache_ / "models--evil--m/snapshots/abc123");
  ASSERT_EQ(list_cached_models("").size(), 1u);
}

}  // namespace
}  // namespace moetrace
