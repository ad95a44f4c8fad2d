// The store lock (one process per store) and the resume checks that need no shard: a store may be
// extended with more samples of the same plan, not shrunk; the shards of its last batching window
// are then computed again, and stay listed until their replacements are.
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <sstream>
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

// Adds samples [from, to) with token id `token` (tells old from recomputed) to w.
void add_samples(TraceWriter& w, int from, int to, int32_t token) {
  for (int i = from; i < to; ++i) {
    SampleRecord r;
    r.sample_id = "d/" + std::to_string(i);
    r.dataset = std::string(1, 'd');  // (= "d" trips g++ 12's -Wrestrict false positive here)
    r.row = i;
    r.token_ids = {token, 1};
    const float logits[8] = {};
    const int32_t expert[2] = {0, 1};
    const uint8_t dropped[2] = {0, 0};
    const float gate[2] = {0.5f, 0.5f};
    r.enc.push_back(LayerRecord{logits, expert, dropped, gate, nullptr});
    w.add(r);
  }
}

std::string file_text(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::ostringstream text;
  text << in.rdbuf();
  return text.str();
}

TEST(CheckResume, MoreTracesExtendFewerAreRefused) {
  const fs::path dir = fresh_dir("extend");
  const StoreSettings s = settings_for(3, 3);
  {
    auto w = TraceWriter::open(dir, s, OpenMode::kCreate);
    add_samples(*w, 0, 3, 5);
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

// A store extended past a plan whose last window spanned two shards (samples_per_shard 2, a window
// of 4 cut at 5 samples): both shards of that window are computed again.
TEST(CheckResume, RedoneShardsStayListedUntilTheirReplacementsAre) {
  const fs::path dir = fresh_dir("redo");
  {
    auto w = TraceWriter::open(dir, settings_for(5, 5), OpenMode::kCreate);
    add_samples(*w, 0, 5, 5);
    w->finish(1.0);
  }
  const std::string before = file_text(dir / "manifest.json");
  StoreSettings more = settings_for(8, 8);
  more.redo_from_sample = 2;
  {
    auto w = TraceWriter::open(dir, more, OpenMode::kResume);
    EXPECT_EQ(w->committed_samples(), 2);
    EXPECT_EQ(w->durable_samples(), 5);  // still listed
    // Interrupted with one of the three samples redone: nothing is replaced, nothing lost.
    add_samples(*w, 2, 3, 6);
    w->commit_partial();
    EXPECT_EQ(file_text(dir / "manifest.json"), before);
  }
  EXPECT_EQ(TraceStore::open(dir).num_samples(), 5);
  {
    auto w = TraceWriter::open(dir, more, OpenMode::kResume);
    EXPECT_EQ(w->committed_samples(), 2);
    add_samples(*w, 2, 8, 6);
    w->finish(1.0);
  }
  EXPECT_TRUE(verify_store(dir).empty());
  const TraceStore store = TraceStore::open(dir);
  ASSERT_EQ(store.num_samples(), 8);
  EXPECT_EQ(store.num_shards(), 4);
  for (int i = 0; i < 8; ++i) {
    EXPECT_EQ(store.sample(i).sample_id, "d/" + std::to_string(i));
    EXPECT_EQ(store.sample(i).token_ids.front(), i < 2 ? 5 : 6) << "sample " << i;
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
