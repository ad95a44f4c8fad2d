// The hub-cache lookup of datasets fetched by `moetrace fetch`: a Parquet conversion cached at
// refs/convert/parquet (huggingface_hub records it as refs/refs/convert/parquet) beside a
// script-only `main` snapshot, and the conversion's folder names.
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <string>

#include "data/catalog.h"
#include "data/locate.h"

namespace moetrace::data {
namespace {

namespace fs = std::filesystem;

// A fresh folder under the temp directory, removed at the end of the test.
class TempDir {
 public:
  explicit TempDir(const std::string& name)
      : path_(fs::temp_directory_path() / (name + "_" + std::to_string(::getpid()))) {
    fs::remove_all(path_);
    fs::create_directories(path_);
  }
  ~TempDir() { fs::remove_all(path_); }
  const fs::path& path() const { return path_; }

 private:
  fs::path path_;
};

void write(const fs::path& p, const std::string& text) {
  fs::create_directories(p.parent_path());
  std::ofstream(p) << text;
}

// The cache huggingface_hub leaves after `snapshot_download("aps/super_glue")` (main: the loading
// script only) and `snapshot_download(..., revision="refs/convert/parquet")`.
fs::path script_main_and_parquet_conversion(const fs::path& cache) {
  const fs::path repo = cache / "datasets--aps--super_glue";
  write(repo / "refs/main", "1111111111111111111111111111111111111111");
  write(repo / "snapshots/1111111111111111111111111111111111111111/super_glue.py", "# script\n");
  write(repo / "snapshots/1111111111111111111111111111111111111111/README.md", "# card\n");
  write(repo / "refs/refs/convert/parquet", "2222222222222222222222222222222222222222");
  const fs::path conv = repo / "snapshots/2222222222222222222222222222222222222222";
  write(conv / "cb/validation/0000.parquet", "x");
  return conv;
}

TEST(LocateSnapshots, ParquetConversionBesideAScriptOnlyMain) {
  TempDir tmp("mt_locate_conv");
  const fs::path conv = script_main_and_parquet_conversion(tmp.path());
  const Catalog catalog = Catalog::builtin();
  // The cache as a root: the same lookup as $HF_HUB_CACHE, without touching the environment.
  auto found = locate(*catalog.find("super_glue/cb"), {tmp.path()}, false);
  ASSERT_TRUE(found.has_value());
  EXPECT_EQ(found->repo_dir, conv);
  ASSERT_EQ(found->files.size(), 1u);
  EXPECT_EQ(found->files[0], conv / "cb/validation/0000.parquet");
  // refs/main's snapshot still comes first.
  const auto dirs = repo_dirs(tmp.path(), "aps/super_glue");
  ASSERT_EQ(dirs.size(), 2u);
  EXPECT_EQ(dirs[0].filename(), "1111111111111111111111111111111111111111");
  EXPECT_EQ(dirs[1], conv);
  // A split the conversion does not hold is still missing.
  EXPECT_FALSE(locate(*catalog.find("super_glue/rte"), {tmp.path()}, false).has_value());
}

TEST(LocateSnapshots, MainWinsWhenItHoldsTheFiles) {
  TempDir tmp("mt_locate_main");
  script_main_and_parquet_conversion(tmp.path());
  const fs::path main_snap =
      tmp.path() / "datasets--aps--super_glue/snapshots/1111111111111111111111111111111111111111";
  write(main_snap / "cb/validation-00000-of-00001.parquet", "x");
  auto found = locate(*Catalog::builtin().find("super_glue/cb"), {tmp.path()}, false);
  ASSERT_TRUE(found.has_value());
  EXPECT_EQ(found->repo_dir, main_snap);
}

TEST(LocateSnapshots, RefsThatLeaveSnapshotsAreIgnored) {
  TempDir tmp("mt_locate_refs");
  const fs::path repo = tmp.path() / "datasets--aps--super_glue";
  write(repo / "refs/main", "../../outside");
  write(repo / "refs/other", "..");
  write(tmp.path() / "outside/cb/validation/0000.parquet", "x");
  fs::create_directories(repo / "snapshots");
  EXPECT_TRUE(cached_snapshots(repo).empty());
  EXPECT_FALSE(locate(*Catalog::builtin().find("super_glue/cb"), {tmp.path()}, false).has_value());
}

TEST(LocateSnapshots, ConversionFolderNames) {
  TempDir tmp("mt_locate_names");
  // A split converted in part: <config>/partial-<split>/NNNN.parquet.
  write(tmp.path() / "conv/cb/partial-validation/0000.parquet", "x");
  write(tmp.path() / "conv/cb/partial-validation/0001.parquet", "x");
  write(tmp.path() / "conv/cb/train/0000.parquet", "x");
  const auto files = split_files(tmp.path() / "conv", "cb", "validation");
  ASSERT_EQ(files.size(), 2u);
  EXPECT_EQ(files[1].filename(), "0001.parquet");
  // An unnamed config is converted as default/.
  write(tmp.path() / "conv2/default/test/0000.parquet", "x");
  write(tmp.path() / "conv2/other/test/0000.parquet", "x");
  const auto unnamed = split_files(tmp.path() / "conv2", "", "test");
  ASSERT_EQ(unnamed.size(), 1u);
  EXPECT_EQ(unnamed[0], tmp.path() / "conv2/default/test/0000.parquet");
}

}  // namespace
}  // namespace moetrace::data
