// The store lock (one process per store) and the resume checks that need no shard: a store may be
// extended with more samples of the same plan, not shrunk.
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <string>

#include "core/error.h"
#include "trace/store.h"

namespace moetrace {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

fs::path fresh_dir(const std::string& tag) {
  const fs::path p =
      fs::temp_directory_path() / ("mt_lock_" + tag + "_" + std::to_string(getpid()));
  fs::remove_all(p);
  return p;
}

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

TEST(StoreLock, SecondHolderIsRefusedWithThePid) {
  const fs::path dir = fresh_dir("pid");
  {
    const StoreLock first(dir);  // creates the directory
    EXPECT_TRUE(fs::exists(dir / kStoreLockName));
    const std::string e = error_of([&] { StoreLock second(dir); });
    EXPECT_NE(e.find("in use by another moetrace process (pid " + std::to_string(getpid()) + ")"),
              std::string::npos)
        << e;
    EXPECT_NE(e.find(dir.string()), std::string::npos) << e;
  }
  // Released with its holder.
  EXPECT_EQ(error_of([&] { StoreLock again(dir); }), "");
  fs::remove_all(dir);
}

TEST(StoreLock, ReleasedWhenTheHolderDies) {
  const fs::path dir = fresh_dir("crash");
  int ready[2];
  ASSERT_EQ(pipe(ready), 0);
  const pid_t child = fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    const StoreLock held(dir);
    char c = 1;
    (void)!write(ready[1], &c, 1);
    pause();  // killed below, never unlocks itself
    _exit(0);
  }
  char c = 0;
  ASSERT_EQ(read(ready[0], &c, 1), 1);
  const std::string e = error_of([&] { StoreLock mine(dir); });
  EXPECT_NE(e.find("(pid " + std::to_string(child) + ")"), std::string::npos) << e;
  kill(child, SIGKILL);
  int status = 0;
  waitpid(child, &status, 0);
  EXPECT_EQ(error_of([&] { StoreLock mine(dir); }), "");
  close(ready[0]);
  close(ready[1]);
  fs::remove_all(dir);
}

StoreSettings settings_for(int64_t traces, int64_t samples) {
  StoreSettings s;
  s.settings = {{"mode", "real"}, {"seed", 7}, {"traces", traces}, {"num_samples", samples}};
  s.model = {{"id", "test/tiny"}};
  s.enc_layers = {1};
  s.num_experts = 4;
  s.d_model = 2;
  s.logits_dtype = DType::kF32;
  s.samples_per_shard = 2;
  s.device = "cpu (test)";
  return s;
}

TEST(CheckResume, MoreTracesExtendFewerAreRefused) {
  const fs::path dir = fresh_dir("extend");
  const StoreSettings s = settings_for(3, 3);
  {
    auto w = TraceWriter::open(dir, s, OpenMode::kCreate);
    for (int i = 0; i < 3; ++i) {
      SampleRecord r;
      r.sample_id = "d/" + std::to_string(i);
      r.dataset = "d";
      r.row = i;
      r.token_ids = {5, 1};
      const float logits[8] = {};
      const int32_t expert[2] = {0, 1};
      const uint8_t dropped[2] = {0, 0};
      const float gate[2] = {0.5f, 0.5f};
      r.enc.push_back(LayerRecord{logits, expert, dropped, gate, nullptr});
      w->add(r);
    }
    w->finish(1.0);
  }
  EXPECT_EQ(error_of([&] { check_resume(dir, s); }), "");
  EXPECT_EQ(error_of([&] { check_resume(dir, settings_for(5, 5)); }), "");
  const std::string fewer = error_of([&] { check_resume(dir, settings_for(2, 2)); });
  EXPECT_NE(fewer.find("settings.traces: 3 (3 samples) in the store, 2 (2 samples) now"),
            std::string::npos)
      << fewer;
  StoreSettings other = settings_for(5, 5);
  other.settings["seed"] = 8;
  const std::string seed = error_of([&] { check_resume(dir, other); });
  EXPECT_NE(seed.find("settings.seed: 7 in the store, 8 now"), std::string::npos) << seed;
  // Extending: the writer resumes the complete store and appends the next samples.
  {
    auto w = TraceWriter::open(dir, settings_for(5, 5), OpenMode::kResume);
    EXPECT_EQ(w->committed_samples(), 3);
  }
  fs::remove_all(dir);
}

TEST(CheckResume, EngineFieldIsWrittenAndOptional) {
  const fs::path dir = fresh_dir("engine");
  StoreSettings s = settings_for(1, 1);
  s.engine = {{"device", "cpu"}, {"threads", 2}};
  { TraceWriter::open(dir, s, OpenMode::kCreate)->finish(0.5); }
  const json m = check_resume(dir, s);
  EXPECT_EQ(m["engine"], s.engine);
  fs::remove_all(dir);
  StoreSettings old = settings_for(1, 1);  // stores written before the field: none in the manifest
  { TraceWriter::open(dir, old, OpenMode::kCreate)->finish(0.5); }
  EXPECT_FALSE(check_resume(dir, old).contains("engine"));
  fs::remove_all(dir);
}

}  // namespace
}  // namespace moetrace
