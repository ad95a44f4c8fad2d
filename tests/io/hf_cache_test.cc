// Hub id resolution against a fake Hugging Face cache in a temp folder.
#include "io/hf_cache.h"

#include <gtest/gtest.h>

#include <cstdlib>

#include "io/io_test_util.h"

namespace moetrace {
namespace {

namespace fs = std::filesystem;
using testing::expect_error;

// Sets an environment variable for one test and restores it after.
class ScopedEnv {
 public:
  ScopedEnv(const char* name, const char* value) : name_(name) {
    const char* old = std::getenv(name);
    had_ = old != nullptr;
    if (had_) old_ = old;
    if (value) {
      ::setenv(name, value, 1);
    } else {
      ::unsetenv(name);
    }
  }
  ~ScopedEnv() {
    if (had_) {
      ::setenv(name_, old_.c_str(), 1);
    } else {
      ::unsetenv(name_);
    }
  }

 private:
  const char* name_;
  bool had_ = false;
  std::string old_;
};

// models--<org>--<name>/{refs/main, snapshots/<rev>/<files>}
void add_model(const fs::path& cache, const std::string& id, const std::vector<std::string>& revs,
               const std::string& main_ref, bool with_checkpoint = true) {
  std::string folder = "models--" + id;
  folder.replace(folder.find('/'), 1, "--");
  for (const std::string& rev : revs) {
    const fs::path snap = cache / folder / "snapshots" / rev;
    fs::create_directories(snap);
    testing::write_bytes(snap / "config.json", "{}");
    if (with_checkpoint) testing::write_bytes(snap / "model.safetensors", "");
  }
  if (!main_ref.empty()) {
    fs::create_directories(cache / folder / "refs");
    testing::write_bytes(cache / folder / "refs/main", main_ref + "\n");
  }
}

class HfCache : public ::testing::Test {
 protected:
  HfCache() : tmp_("hf_cache"), cache_(tmp_ / "hub"), env_("HF_HUB_CACHE", cache_.c_str()) {
    add_model(cache_, "google/switch-base-8", {"aaa111", "bbb222"}, "bbb222");
    add_model(cache_, "google/switch-base-128", {"ccc333"}, "");   // no refs/main: the one snapshot
    add_model(cache_, "google/switch-base-16", {"d1", "d2"}, "");  // ambiguous
    add_model(cache_, "google/switch-base-32", {"e1"}, "e1", /*with_checkpoint=*/false);
    add_model(cache_, "google/switch-large-128", {"f1"}, "f1");
    add_model(cache_, "t5/other", {"g1"}, "g1");
  }
  testing::TempDir tmp_;
  fs::path cache_;
  ScopedEnv env_;
};

TEST_F(HfCache, ResolvesRefsMain) {
  const ResolvedModel m = resolve_model("google/switch-base-8");
  EXPECT_EQ(m.id, "google/switch-base-8");
  EXPECT_EQ(m.revision, "bbb222");
  EXPECT_EQ(m.dir, cache_ / "models--google--switch-base-8/snapshots/bbb222");
  // An explicit snapshot.
  EXPECT_EQ(resolve_model("google/switch-base-8@aaa111").revision, "aaa111");
}

TEST_F(HfCache, SingleSnapshotWithoutRefs) {
  const ResolvedModel m = resolve_model("google/switch-base-128");
  EXPECT_EQ(m.revision, "ccc333");
  EXPECT_EQ(m.dir, cache_ / "models--google--switch-base-128/snapshots/ccc333");
}

TEST_F(HfCache, DirectoryIsUsedAsItIs) {
  const std::string dir = (testing::kData / "fixtures/tiny-a/model").string();
  const ResolvedModel m = resolve_model(dir);
  EXPECT_EQ(m.dir, fs::path(dir));
  EXPECT_EQ(m.id, dir);
  EXPECT_EQ(m.revision, "");
}

TEST_F(HfCache, ErrorsSayWhereTheyLooked) {
  expect_error([] { resolve_model("google/switch-base-64"); },
               {"google/switch-base-64", "models--google--switch-base-64", "$HF_HUB_CACHE"});
  expect_error([] { resolve_model("google/switch-base-16"); }, {"2 snapshots", "d1, d2"});
  expect_error([] { resolve_model("google/switch-base-8@nope"); }, {"refs/nope"});
  expect_error([] { resolve_model("/no/such/dir"); }, {"/no/such/dir", "no such model directory"});
  expect_error([] { resolve_model("../escape/x"); }, {"no such model directory"});
}

TEST_F(HfCache, ListsModelsWithCheckpointsLargestLast) {
  const std::vector<ResolvedModel> ms = list_cached_models("google/switch-base-");
  ASSERT_EQ(ms.size(), 2u);  // -16 is ambiguous, -32 has no checkpoint
  EXPECT_EQ(ms[0].id, "google/switch-base-8");
  EXPECT_EQ(ms[1].id, "google/switch-base-128");
  EXPECT_EQ(list_cached_models("google/").size(), 3u);
  EXPECT_TRUE(list_cached_models("nobody/").empty());
}

TEST_F(HfCache, FallsBackToHfHome) {
  ScopedEnv no_hub("HF_HUB_CACHE", nullptr);
  ScopedEnv no_legacy("HUGGINGFACE_HUB_CACHE", nullptr);
  ScopedEnv home("HF_HOME", tmp_.path().c_str());  // the models sit in $HF_HOME/hub
  EXPECT_EQ(hf_hub_cache_dir(), tmp_ / "hub");
  EXPECT_EQ(resolve_model("google/switch-base-8").revision, "bbb222");
  ScopedEnv no_home("HF_HOME", nullptr);
  ScopedEnv no_xdg("XDG_CACHE_HOME", nullptr);
  ScopedEnv user_home("HOME", "/home/someone");
  EXPECT_EQ(hf_hub_cache_dir(), fs::path("/home/someone/.cache/huggingface/hub"));
}

}  // namespace
}  // namespace moetrace
