#include "trace/store.h"

#include <gtest/gtest.h>
#include <signal.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <random>
#include <sstream>

#include "core/error.h"
#include "core/sha256.h"
#include "io/safetensors.h"

namespace moetrace {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

// A fresh, empty directory per test (removed at the end).
class TempDir {
 public:
  explicit TempDir(const std::string& tag) {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    std::string name =
        std::string("mt_trace_") + info->name() + "_" + tag + "_" + std::to_string(::getpid());
    for (char& c : name) {
      if (c == '/') c = '_';
    }
    path_ = fs::temp_directory_path() / name;
    fs::remove_all(path_);
    fs::create_directories(path_);
  }
  ~TempDir() {
    std::error_code ec;
    fs::permissions(path_, fs::perms::owner_all, fs::perm_options::add, ec);
    fs::remove_all(path_, ec);
  }
  const fs::path& path() const { return path_; }

 private:
  fs::path path_;
};

std::string read_file(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

void write_file(const fs::path& p, const std::string& bytes) {
  std::ofstream out(p, std::ios::binary | std::ios::trunc);
  out << bytes;
}

StoreSettings make_settings(DType logits, std::optional<DType> hidden, bool decoder,
                            int64_t per_shard) {
  StoreSettings s;
  s.settings = {{"mode", "real"}, {"seed", 7}, {"logits_dtype", std::string(dtype_name(logits))}};
  s.model = {{"id", "test/tiny"}, {"tokenizer_sha256", "00"}};
  s.command_line = {"moetrace", "collect", "--test"};
  s.enc_layers = {1, 3};
  if (decoder) s.dec_layers = {1};
  s.num_experts = 5;
  s.d_model = 6;
  s.logits_dtype = logits;
  s.hidden_dtype = hidden;
  s.decoder = decoder;
  s.samples_per_shard = per_shard;
  s.device = "cpu (test)";
  return s;
}

struct OwnedLayer {
  std::vector<float> logits, gate, hidden;
  std::vector<int32_t> expert;
  std::vector<uint8_t> dropped;
};

// Sample i of a deterministic random collection: the same (settings, i) always gives the same
// record, so an interrupted and resumed run can replay it.
struct TestSample {
  std::string id, dataset;
  int64_t row = 0;
  bool synthetic = false;
  std::vector<int32_t> tokens, dec_in, dec_out;
  std::vector<OwnedLayer> enc, dec;

  TestSample(const StoreSettings& s, int64_t i) {
    std::mt19937 rng(static_cast<uint32_t>(1000 + i));
    const char* names[] = {"glue/mrpc", "glue/sst2", "ag_news"};
    dataset = names[i % 3];
    row = i * 7;
    id = dataset + "/default/test/" + std::to_string(row);
    synthetic = i % 4 == 3;
    const int n = 1 + static_cast<int>(rng() % 9);
    for (int k = 0; k < n; ++k) tokens.push_back(static_cast<int32_t>(rng() % 32000));
    tokens.back() = 1;
    const int g = s.decoder ? 1 + static_cast<int>(rng() % 4) : 0;
    for (int k = 0; k < g; ++k) {
      dec_in.push_back(k == 0 ? 0 : static_cast<int32_t>(rng() % 32000));
      dec_out.push_back(static_cast<int32_t>(rng() % 32000));
    }
    auto layer = [&](int rows, bool with_hidden) {
      OwnedLayer l;
      std::normal_distribution<float> nd(0.f, 3.f);
      for (int k = 0; k < rows * s.num_experts; ++k) l.logits.push_back(nd(rng));
      for (int k = 0; k < rows; ++k) {
        l.expert.push_back(static_cast<int32_t>(rng() % s.num_experts));
        l.dropped.push_back(rng() % 5 == 0);
        l.gate.push_back(std::uniform_real_distribution<float>(0.2f, 1.f)(rng));
      }
      if (with_hidden) {
        for (int k = 0; k < rows * s.d_model; ++k) l.hidden.push_back(nd(rng));
      }
      return l;
    };
    for (size_t k = 0; k < s.enc_layers.size(); ++k) enc.push_back(layer(n, i % 5 != 2));
    for (size_t k = 0; k < s.dec_layers.size(); ++k) dec.push_back(layer(g, true));
  }

  SampleRecord record() const {
    SampleRecord r;
    r.sample_id = id;
    r.dataset = dataset;
    r.row = row;
    r.synthetic = synthetic;
    r.token_ids = tokens;
    r.dec_input_ids = dec_in;
    r.dec_output_ids = dec_out;
    auto lr = [](const OwnedLayer& l) {
      LayerRecord x;
      x.router_logits = l.logits.data();
      x.expert = l.expert.data();
      x.dropped = l.dropped.data();
      x.gate = l.gate.data();
      x.hidden = l.hidden.empty() ? nullptr : l.hidden.data();
      return x;
    };
    for (const auto& l : enc) r.enc.push_back(lr(l));
    for (const auto& l : dec) r.dec.push_back(lr(l));
    return r;
  }
};

void add_samples(TraceWriter* w, const StoreSettings& s, int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; ++i) w->add(TestSample(s, i).record());
}

void write_store(const fs::path& dir, const StoreSettings& s, int64_t n, double seconds = 1.0) {
  auto w = TraceWriter::open(dir, s, OpenMode::kCreate);
  add_samples(w.get(), s, 0, n);
  w->finish(seconds);
}

// The value a stored float comes back as.
float stored(DType t, float x) {
  switch (t) {
    case DType::kF16:
      return f16_to_f32(f32_to_f16(x));
    case DType::kBF16:
      return bf16_to_f32(f32_to_bf16(x));
    default:
      return x;
  }
}

void expect_layer_equal(const OwnedLayer& want, const LayerRecordOwned& got, const StoreSettings& s,
                        size_t rows, const std::string& what) {
  ASSERT_EQ(got.expert, want.expert) << what;
  ASSERT_EQ(got.dropped, want.dropped) << what;
  ASSERT_EQ(got.gate, want.gate) << what;
  ASSERT_EQ(got.router_logits.size(), want.logits.size()) << what;
  for (size_t k = 0; k < want.logits.size(); ++k) {
    // Bit-exact for F32: compare representations, not values.
    const float w = stored(s.logits_dtype, want.logits[k]);
    ASSERT_EQ(std::memcmp(&w, &got.router_logits[k], 4), 0) << what << " logit " << k;
  }
  if (!s.hidden_dtype) {
    ASSERT_TRUE(got.hidden.empty()) << what;
    return;
  }
  ASSERT_EQ(got.hidden.size(), rows * static_cast<size_t>(s.d_model)) << what;
  for (size_t k = 0; k < got.hidden.size(); ++k) {
    const float w = want.hidden.empty() ? 0.f : stored(*s.hidden_dtype, want.hidden[k]);
    ASSERT_EQ(got.hidden[k], w) << what << " hidden " << k;
  }
}

std::map<std::string, std::string> shard_bytes(const fs::path& dir) {
  std::map<std::string, std::string> out;
  for (const auto& e : fs::directory_iterator(dir)) {
    const std::string name = e.path().filename().string();
    if (name.rfind("shard-", 0) == 0) out[name] = read_file(e.path());
  }
  return out;
}

bool contains(const std::vector<std::string>& problems, const std::string& needle) {
  for (const auto& p : problems) {
    if (p.find(needle) != std::string::npos) return true;
  }
  return false;
}

std::string joined(const std::vector<std::string>& problems) {
  std::string s;
  for (const auto& p : problems) s += p + "\n";
  return s;
}

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

struct Config {
  DType logits;
  std::optional<DType> hidden;
  bool decoder;
};

class RoundTrip : public ::testing::TestWithParam<Config> {};

TEST_P(RoundTrip, ReadsBackWhatWasWritten) {
  const Config c = GetParam();
  TempDir tmp("rt");
  const fs::path dir = tmp.path() / "store";
  const StoreSettings s = make_settings(c.logits, c.hidden, c.decoder, 4);
  const int64_t n = 11;  // shards of 4, 4 and 3 samples
  write_store(dir, s, n, 2.5);

  EXPECT_TRUE(is_trace_store(dir));
  const auto problems = verify_store(dir);
  EXPECT_TRUE(problems.empty()) << joined(problems);

  const TraceStore store = TraceStore::open(dir);
  ASSERT_EQ(store.num_samples(), n);
  ASSERT_EQ(store.num_shards(), 3);
  const json& m = store.manifest();
  EXPECT_EQ(m["complete"], true);
  EXPECT_EQ(m["format"], "moetrace-trace");
  EXPECT_EQ(m["format_version"], 1);
  EXPECT_EQ(m["shards"][2]["num_samples"], 3);
  EXPECT_EQ(m["total_traces"], n * 2);
  EXPECT_DOUBLE_EQ(m["collection_time"].get<double>(), 2.5);
  EXPECT_EQ(m["settings"], s.settings);
  EXPECT_EQ(m["model"], s.model);
  EXPECT_EQ(m["command_line"], json(s.command_line));
  EXPECT_EQ(m["device"], "cpu (test)");

  // Counts recomputed here from the records, independently of the library.
  std::vector<int64_t> dist(5, 0);
  std::map<std::string, int64_t> per_dataset;
  int64_t tokens = 0, dropped_enc1 = 0, dec_tokens = 0;
  for (int64_t i = 0; i < n; ++i) {
    const TestSample want(s, i);
    const SampleRecordOwned got = store.sample(i);
    const std::string what = "sample " + std::to_string(i);
    ASSERT_EQ(got.sample_id, want.id) << what;
    ASSERT_EQ(got.dataset, want.dataset) << what;
    ASSERT_EQ(got.row, want.row) << what;
    ASSERT_EQ(got.synthetic, want.synthetic) << what;
    ASSERT_EQ(got.token_ids, want.tokens) << what;
    ASSERT_EQ(got.enc.size(), 2u);
    for (size_t l = 0; l < 2; ++l) {
      expect_layer_equal(want.enc[l], got.enc[l], s, want.tokens.size(), what);
      for (int32_t e : want.enc[l].expert) ++dist[static_cast<size_t>(e)];
    }
    for (uint8_t d : want.enc[0].dropped) dropped_enc1 += d;
    ASSERT_EQ(got.dec_input_ids, want.dec_in) << what;
    ASSERT_EQ(got.dec_output_ids, want.dec_out) << what;
    ASSERT_EQ(got.dec.size(), want.dec.size()) << what;
    for (size_t l = 0; l < want.dec.size(); ++l) {
      expect_layer_equal(want.dec[l], got.dec[l], s, want.dec_in.size(), what + " dec");
    }
    tokens += static_cast<int64_t>(want.tokens.size());
    dec_tokens += static_cast<int64_t>(want.dec_in.size());
    per_dataset[want.dataset] += 2;
  }
  EXPECT_EQ(m["num_tokens"], tokens);
  EXPECT_EQ(m["num_decoder_tokens"], dec_tokens);
  for (size_t e = 0; e < 5; ++e) EXPECT_EQ(m["expert_distribution"][std::to_string(e)], dist[e]);
  EXPECT_EQ(m["dataset_distribution"], json(per_dataset));
  EXPECT_EQ(m["per_layer"]["enc.1"]["dropped"], dropped_enc1);
  EXPECT_EQ(m["per_layer"]["enc.1"]["tokens"], tokens);
  EXPECT_EQ(m["per_layer"].contains("dec.1"), c.decoder);
  EXPECT_DOUBLE_EQ(m["throughput_tokens_per_s"].get<double>(), static_cast<double>(tokens) / 2.5);
  EXPECT_THROW(store.sample(n), Error);

  // Shards are plain safetensors with the documented metadata.
  const SafetensorsFile f = SafetensorsFile::open(dir / "shard-00001.safetensors");
  EXPECT_EQ(f.metadata().at("format"), "moetrace-trace");
  EXPECT_EQ(f.metadata().at("format_version"), "1");
  EXPECT_EQ(f.metadata().at("first_sample"), "4");
  EXPECT_EQ(json::parse(f.metadata().at("sample_ids"))[0], TestSample(s, 4).id);
  EXPECT_EQ(json::parse(f.metadata().at("rows"))[1], 35);
  EXPECT_EQ(f.find("enc.3.router_logits")->view.dtype, c.logits);
  EXPECT_EQ(f.find("enc.3.hidden") != nullptr, c.hidden.has_value());
  EXPECT_EQ(f.find("dec.sample_offsets") != nullptr, c.decoder);
}

INSTANTIATE_TEST_SUITE_P(Dtypes, RoundTrip,
                         ::testing::Values(Config{DType::kF32, std::nullopt, false},
                                           Config{DType::kF16, std::nullopt, false},
                                           Config{DType::kBF16, std::nullopt, false},
                                           Config{DType::kF32, DType::kF32, false},
                                           Config{DType::kF16, DType::kBF16, true},
                                           Config{DType::kBF16, DType::kF32, true},
                                           Config{DType::kF32, std::nullopt, true}),
                         [](const ::testing::TestParamInfo<Config>& info) {
                           const Config& c = info.param;
                           return std::string(dtype_name(c.logits)) + "_hidden" +
                                  (c.hidden ? std::string(dtype_name(*c.hidden))
                                            : std::string("None")) +
                                  (c.decoder ? "_decoder" : "");
                         });

TEST(TraceWriter, EmptyStoreIsValid) {
  TempDir tmp("empty");
  const fs::path dir = tmp.path() / "store";
  const StoreSettings s = make_settings(DType::kF16, std::nullopt, false, 4);
  { auto w = TraceWriter::open(dir, s, OpenMode::kCreate); }
  // A store opened and never written to already has a manifest (complete=false) and verifies.
  EXPECT_TRUE(is_trace_store(dir));
  EXPECT_TRUE(verify_store(dir).empty()) << joined(verify_store(dir));
  EXPECT_EQ(TraceStore::open(dir).num_samples(), 0);
  EXPECT_EQ(TraceStore::open(dir).manifest()["complete"], false);
  auto w = TraceWriter::open(dir, s, OpenMode::kResume);
  EXPECT_EQ(w->committed_samples(), 0);
  w->finish(0.0);
  EXPECT_TRUE(verify_store(dir).empty()) << joined(verify_store(dir));
}

TEST(TraceWriter, ManifestFollowsEveryShardCommit) {
  TempDir tmp("follow");
  const fs::path dir = tmp.path() / "store";
  const StoreSettings s = make_settings(DType::kF16, std::nullopt, false, 3);
  auto w = TraceWriter::open(dir, s, OpenMode::kCreate);
  add_samples(w.get(), s, 0, 7);
  EXPECT_EQ(w->committed_samples(), 7);
  w->commit_partial();  // waits for the two full shards, then writes the partial third
  EXPECT_EQ(w->durable_samples(), 7);
  const json m = TraceStore::open(dir).manifest();
  EXPECT_EQ(m["complete"], false);
  EXPECT_EQ(m["num_samples"], 7);
  EXPECT_EQ(m["shards"].size(), 3u);
  EXPECT_TRUE(verify_store(dir).empty()) << joined(verify_store(dir));
  w->finish(1.0);
  EXPECT_EQ(TraceStore::open(dir).manifest()["complete"], true);
  EXPECT_THROW(w->add(TestSample(s, 7).record()), Error);
}

// Destroying a writer mid-way (its queued shards are committed, its partial buffer is not), then
// resuming on top of leftovers of an interrupted commit, gives the shards of an uninterrupted run.
TEST(TraceWriter, ResumeAfterDestroyMatchesUninterruptedRun) {
  TempDir tmp("resume");
  const StoreSettings s = make_settings(DType::kBF16, DType::kBF16, true, 4);
  const int64_t n = 14;
  write_store(tmp.path() / "ref", s, n);
  const auto want = shard_bytes(tmp.path() / "ref");
  ASSERT_EQ(want.size(), 4u);

  const fs::path dir = tmp.path() / "store";
  {
    auto w = TraceWriter::open(dir, s, OpenMode::kCreate);
    add_samples(w.get(), s, 0, 10);  // shards 0 and 1 full, 2 samples buffered
  }
  EXPECT_TRUE(verify_store(dir).empty()) << joined(verify_store(dir));
  EXPECT_EQ(TraceStore::open(dir).num_samples(), 8);
  // Leftovers of a commit that a kill interrupted, and an unlisted shard.
  write_file(dir / ".tmp-shard-00002.safetensors", "partial garbage");
  write_file(dir / ".tmp-manifest.json", "{\"format\": ");
  write_file(dir / "shard-00002.safetensors", std::string(100, 'x'));
  write_file(dir / "shard-00007.safetensors", "");
  {
    auto w = TraceWriter::open(dir, s, OpenMode::kResume);
    EXPECT_EQ(w->committed_samples(), 8);
    EXPECT_FALSE(fs::exists(dir / ".tmp-shard-00002.safetensors"));
    EXPECT_FALSE(fs::exists(dir / ".tmp-manifest.json"));
    EXPECT_FALSE(fs::exists(dir / "shard-00002.safetensors"));
    EXPECT_FALSE(fs::exists(dir / "shard-00007.safetensors"));
    add_samples(w.get(), s, w->committed_samples(), n);
    w->finish(1.0);
  }
  EXPECT_EQ(shard_bytes(dir), want);
  EXPECT_TRUE(verify_store(dir).empty()) << joined(verify_store(dir));
  const json a = TraceStore::open(dir).manifest(),
             b = TraceStore::open(tmp.path() / "ref").manifest();
  EXPECT_EQ(a["shards"], b["shards"]);
  EXPECT_EQ(a["expert_distribution"], b["expert_distribution"]);
  EXPECT_EQ(a["per_layer"], b["per_layer"]);
  EXPECT_EQ(a["dataset_distribution"], b["dataset_distribution"]);
}

// The Ctrl-C path: commit_partial() writes a short last shard; a resumed run loads it back and
// rewrites it full, so shard boundaries and contents still equal an uninterrupted run's.
TEST(TraceWriter, ResumeAfterPartialCommitRewritesTheShortShard) {
  TempDir tmp("partial");
  const StoreSettings s = make_settings(DType::kF32, std::nullopt, false, 4);
  const int64_t n = 13;
  write_store(tmp.path() / "ref", s, n);
  const auto want = shard_bytes(tmp.path() / "ref");

  const fs::path dir = tmp.path() / "store";
  {
    auto w = TraceWriter::open(dir, s, OpenMode::kCreate);
    add_samples(w.get(), s, 0, 6);
    w->commit_partial();
  }
  EXPECT_EQ(TraceStore::open(dir).manifest()["shards"][1]["num_samples"], 2);
  {
    auto w = TraceWriter::open(dir, s, OpenMode::kResume);
    ASSERT_EQ(w->committed_samples(), 6);
    add_samples(w.get(), s, 6, 9);
    w->commit_partial();  // interrupted again, inside the reloaded shard
  }
  {
    auto w = TraceWriter::open(dir, s, OpenMode::kResume);
    ASSERT_EQ(w->committed_samples(), 9);
    add_samples(w.get(), s, 9, n);
    w->finish(3.0);
  }
  EXPECT_EQ(shard_bytes(dir), want);
  EXPECT_TRUE(verify_store(dir).empty()) << joined(verify_store(dir));
  const double t1 = TraceStore::open(dir).manifest()["collection_time"].get<double>();
  EXPECT_GE(t1, 3.0);
  EXPECT_LT(t1, 60.0);
  {  // resuming a complete store adds nothing but the time spent
    auto w = TraceWriter::open(dir, s, OpenMode::kResume);
    EXPECT_EQ(w->committed_samples(), n);
    w->finish(1.5);
  }
  EXPECT_DOUBLE_EQ(TraceStore::open(dir).manifest()["collection_time"].get<double>(), t1 + 1.5);
  EXPECT_EQ(shard_bytes(dir), want);
}

// kill -9 of a writing process at several points: the store verifies (the committed shards), and
// a resumed run completes it to the uninterrupted run's shards.
TEST(TraceWriter, SurvivesKillAtAnyPoint) {
  TempDir tmp("kill");
  const StoreSettings s = make_settings(DType::kF16, DType::kBF16, false, 3);
  const int64_t n = 20;
  write_store(tmp.path() / "ref", s, n);
  const auto want = shard_bytes(tmp.path() / "ref");
  for (int64_t stop_after : {0, 2, 3, 5, 7, 10, 16, 19}) {
    const fs::path dir = tmp.path() / ("store" + std::to_string(stop_after));
    const pid_t pid = ::fork();
    ASSERT_GE(pid, 0);
    if (pid == 0) {
      auto w = TraceWriter::open(dir, s, OpenMode::kCreate);
      add_samples(w.get(), s, 0, stop_after);
      ::kill(::getpid(), SIGKILL);  // possibly while the writer thread is mid-commit
      ::_exit(3);
    }
    int status = 0;
    ::waitpid(pid, &status, 0);
    ASSERT_TRUE(WIFSIGNALED(status)) << stop_after;
    const auto problems = verify_store(dir);
    EXPECT_TRUE(problems.empty()) << "killed after " << stop_after << ":\n" << joined(problems);
    auto w = TraceWriter::open(dir, s, OpenMode::kResume);
    EXPECT_LE(w->committed_samples(), stop_after);
    EXPECT_EQ(w->committed_samples() % 3, 0);
    add_samples(w.get(), s, w->committed_samples(), n);
    w->finish(1.0);
    EXPECT_EQ(shard_bytes(dir), want) << "killed after " << stop_after;
  }
}

TEST(TraceWriter, CreateRefusesNonEmptyDirectory) {
  TempDir tmp("create");
  const StoreSettings s = make_settings(DType::kF16, std::nullopt, false, 4);
  const fs::path dir = tmp.path() / "store";
  write_store(dir, s, 5);
  const std::string err = error_of([&] { TraceWriter::open(dir, s, OpenMode::kCreate); });
  EXPECT_NE(err.find("use --resume or --overwrite"), std::string::npos) << err;
  EXPECT_NE(err.find(dir.string()), std::string::npos) << err;
  EXPECT_TRUE(verify_store(dir).empty());

  const fs::path other = tmp.path() / "other";
  fs::create_directories(other);
  write_file(other / "notes.txt", "mine");
  EXPECT_NE(error_of([&] { TraceWriter::open(other, s, OpenMode::kCreate); }).find("--overwrite"),
            std::string::npos);
  // An existing empty directory is fine.
  const fs::path empty = tmp.path() / "empty";
  fs::create_directories(empty);
  write_store(empty, s, 2);
  EXPECT_TRUE(verify_store(empty).empty());
}

TEST(TraceWriter, ResumeRefusesOtherSettingsNamingTheDifference) {
  TempDir tmp("settings");
  const StoreSettings s = make_settings(DType::kF16, std::nullopt, false, 4);
  const fs::path dir = tmp.path() / "store";
  write_store(dir, s, 5);
  auto refused = [&](const StoreSettings& other) {
    return error_of([&] { TraceWriter::open(dir, other, OpenMode::kResume); });
  };
  StoreSettings a = s;
  a.settings["seed"] = 8;
  std::string err = refused(a);
  EXPECT_NE(err.find("settings.seed: 7 in the store, 8 now"), std::string::npos) << err;
  a = s;
  a.model["id"] = "test/other";
  err = refused(a);
  EXPECT_NE(err.find("model.id"), std::string::npos) << err;
  a = s;
  a.logits_dtype = DType::kBF16;
  err = refused(a);
  EXPECT_NE(err.find("logits_dtype: F16 in the store, BF16 now"), std::string::npos) << err;
  a = s;
  a.hidden_dtype = DType::kBF16;
  EXPECT_NE(refused(a).find("hidden_dtype"), std::string::npos);
  a = s;
  a.enc_layers = {1, 5};
  EXPECT_NE(refused(a).find("layers.encoder"), std::string::npos);
  a = s;
  a.num_experts = 6;
  EXPECT_NE(refused(a).find("num_experts"), std::string::npos);
  a = s;
  a.samples_per_shard = 5;
  EXPECT_NE(refused(a).find("samples_per_shard"), std::string::npos);
  a = s;
  a.decoder = true;
  EXPECT_NE(refused(a).find("decoder"), std::string::npos);
  // The command line and the device may change between runs.
  a = s;
  a.command_line = {"moetrace", "collect", "--resume"};
  a.device = "cuda";
  EXPECT_EQ(refused(a), "");
  EXPECT_TRUE(verify_store(dir).empty());
}

TEST(TraceWriter, ResumeRefusesDamagedCommittedShard) {
  TempDir tmp("damaged");
  const StoreSettings s = make_settings(DType::kF16, std::nullopt, false, 4);
  const fs::path dir = tmp.path() / "store";
  write_store(dir, s, 9);
  std::string bytes = read_file(dir / "shard-00001.safetensors");
  bytes[bytes.size() - 3] ^= 0x10;
  write_file(dir / "shard-00001.safetensors", bytes);
  const std::string err = error_of([&] { TraceWriter::open(dir, s, OpenMode::kResume); });
  EXPECT_NE(err.find("shard-00001.safetensors"), std::string::npos) << err;
  EXPECT_NE(err.find("sha256"), std::string::npos) << err;
}

TEST(TraceWriter, OverwriteReplacesOnlyAStore) {
  TempDir tmp("overwrite");
  const StoreSettings s = make_settings(DType::kF16, std::nullopt, false, 4);
  const fs::path dir = tmp.path() / "store";
  write_store(dir, s, 9);
  write_file(dir / ".tmp-shard-00003.safetensors", "x");
  {
    auto w = TraceWriter::open(dir, s, OpenMode::kOverwrite);
    EXPECT_EQ(w->committed_samples(), 0);
    EXPECT_FALSE(fs::exists(dir / "shard-00001.safetensors"));
    EXPECT_FALSE(fs::exists(dir / ".tmp-shard-00003.safetensors"));
    add_samples(w.get(), s, 0, 2);
    w->finish(0.5);
  }
  EXPECT_EQ(TraceStore::open(dir).num_samples(), 2);
  write_file(dir / "notes.txt", "mine");
  const std::string err = error_of([&] { TraceWriter::open(dir, s, OpenMode::kOverwrite); });
  EXPECT_NE(err.find("notes.txt"), std::string::npos) << err;
  EXPECT_TRUE(fs::exists(dir / "notes.txt"));
  EXPECT_TRUE(fs::exists(dir / "shard-00000.safetensors"));
}

TEST(TraceWriter, RejectsMalformedRecords) {
  TempDir tmp("records");
  const StoreSettings s = make_settings(DType::kF16, std::nullopt, false, 4);
  auto w = TraceWriter::open(tmp.path() / "store", s, OpenMode::kCreate);
  TestSample a(s, 0);
  a.enc[1].expert[0] = 5;
  std::string err = error_of([&] { w->add(a.record()); });
  EXPECT_NE(err.find("enc.3.expert[0] = 5 is outside [0, 5)"), std::string::npos) << err;
  TestSample b(s, 0);
  SampleRecord r = b.record();
  r.enc.pop_back();
  EXPECT_NE(error_of([&] { w->add(r); }).find("1 encoder layer records, expected 2"),
            std::string::npos);
  w->add(b.record());
  EXPECT_NE(error_of([&] { w->add(b.record()); }).find("already in the store"), std::string::npos);
  TestSample c(s, 1);
  c.enc[0].dropped[0] = 2;
  EXPECT_NE(error_of([&] { w->add(c.record()); }).find("dropped"), std::string::npos);
  w->finish(0.1);
  EXPECT_EQ(TraceStore::open(tmp.path() / "store").num_samples(), 1);
}

// verify_store() catches each kind of damage, naming the file.
class Verify : public ::testing::Test {
 protected:
  void SetUp() override {
    tmp_ = std::make_unique<TempDir>("verify");
    dir_ = tmp_->path() / "store";
    write_store(dir_, make_settings(DType::kF16, DType::kBF16, true, 4), 10);
    ASSERT_TRUE(verify_store(dir_).empty()) << joined(verify_store(dir_));
  }
  json manifest() const { return json::parse(read_file(dir_ / "manifest.json")); }
  void set_manifest(const json& m) { write_file(dir_ / "manifest.json", m.dump(2)); }
  std::unique_ptr<TempDir> tmp_;
  fs::path dir_;
};

TEST_F(Verify, CorruptedByte) {
  const fs::path p = dir_ / "shard-00001.safetensors";
  std::string bytes = read_file(p);
  bytes[bytes.size() / 2 + 17] ^= 0x01;
  write_file(p, bytes);
  const auto problems = verify_store(dir_);
  EXPECT_TRUE(contains(problems, "shard-00001.safetensors: sha256 is")) << joined(problems);
}

TEST_F(Verify, TruncatedShard) {
  const fs::path p = dir_ / "shard-00002.safetensors";
  fs::resize_file(p, fs::file_size(p) - 10);
  const auto problems = verify_store(dir_);
  EXPECT_TRUE(contains(problems, "shard-00002.safetensors: has")) << joined(problems);
  EXPECT_TRUE(contains(problems, "truncated")) << joined(problems);
}

TEST_F(Verify, MissingShard) {
  fs::remove(dir_ / "shard-00000.safetensors");
  const auto problems = verify_store(dir_);
  EXPECT_TRUE(contains(problems, "shard-00000.safetensors: missing")) << joined(problems);
  EXPECT_THROW(TraceStore::open(dir_).sample(0), Error);
}

TEST_F(Verify, ManifestCountsThatDisagree) {
  json m = manifest();
  m["expert_distribution"]["2"] = m["expert_distribution"]["2"].get<int64_t>() + 1;
  set_manifest(m);
  auto problems = verify_store(dir_);
  // The line names the entry that differs, not the whole distribution.
  const int64_t e2 = m["expert_distribution"]["2"].get<int64_t>();
  EXPECT_TRUE(contains(problems, "expert_distribution.2 is " + std::to_string(e2) +
                                     " but the shards give " + std::to_string(e2 - 1)))
      << joined(problems);

  m = manifest();
  m["expert_distribution"]["2"] = m["expert_distribution"]["2"].get<int64_t>() - 1;
  m["num_samples"] = 11;
  m["per_layer"]["dec.1"]["dropped"] = 99;
  m["dataset_distribution"]["ag_news"] = 1;
  set_manifest(m);
  problems = verify_store(dir_);
  EXPECT_EQ(problems.size(), 3u) << joined(problems);
  EXPECT_TRUE(contains(problems, "num_samples is 11 but the shards give 10")) << joined(problems);
  EXPECT_TRUE(contains(problems, "per_layer.dec.1.dropped is 99 but the shards give "))
      << joined(problems);
  EXPECT_TRUE(contains(problems, "dataset_distribution.ag_news is 1 but the shards give "))
      << joined(problems);

  m = manifest();
  m["shards"][1]["num_tokens"] = 1;
  set_manifest(m);
  problems = verify_store(dir_);
  EXPECT_TRUE(contains(problems, "shard-00001.safetensors: holds")) << joined(problems);
}

TEST_F(Verify, ContentsThatDisagreeWithTheManifest) {
  // A shard rewritten with an expert outside [0, E) and its hash updated: only the content check
  // can see it.
  const fs::path p = dir_ / "shard-00000.safetensors";
  const SafetensorsFile f = SafetensorsFile::open(p);
  std::vector<Tensor> copies;
  std::vector<NamedView> views;
  for (const auto& t : f.tensors()) {
    copies.push_back(Tensor::from_view(t.view));
    views.push_back({t.name, copies.back().view()});
  }
  for (size_t k = 0; k < views.size(); ++k) {
    if (views[k].name == "enc.3.expert") copies[k].data<int32_t>()[1] = 9;
  }
  const auto meta = f.metadata();
  write_safetensors(dir_ / "rewritten", views, meta);
  fs::rename(dir_ / "rewritten", p);
  json m = manifest();
  m["shards"][0]["sha256"] = sha256_file(p);
  m["shards"][0]["bytes"] = fs::file_size(p);
  set_manifest(m);
  const auto problems = verify_store(dir_);
  EXPECT_TRUE(contains(problems, "enc.3.expert[1] = 9 is outside [0, 5)")) << joined(problems);
}

// Stores of other writers (numpy-made test stores) may leave out the storage fields; they come from
// "settings" and the first shard then.
TEST_F(Verify, StorageFieldsFromSettings) {
  json m = manifest();
  for (const char* k : {"logits_dtype", "hidden_dtype", "decoder", "samples_per_shard"}) m.erase(k);
  m["settings"]["hidden_dtype"] = "BF16";
  set_manifest(m);
  EXPECT_TRUE(verify_store(dir_).empty()) << joined(verify_store(dir_));
  EXPECT_EQ(TraceStore::open(dir_).sample(9).dec.size(), 1u);
  m["settings"].erase("hidden_dtype");
  set_manifest(m);
  EXPECT_TRUE(contains(verify_store(dir_), "missing field \"hidden_dtype\""));
}

TEST_F(Verify, UnknownFormatVersion) {
  json m = manifest();
  m["format_version"] = 3;
  set_manifest(m);
  const auto problems = verify_store(dir_);
  ASSERT_EQ(problems.size(), 1u);
  EXPECT_NE(problems[0].find("format_version 3 is not supported"), std::string::npos)
      << problems[0];
  EXPECT_THROW(TraceStore::open(dir_), Error);
  EXPECT_TRUE(is_trace_store(dir_));
  EXPECT_FALSE(is_trace_store(tmp_->path()));
}

TEST_F(Verify, Summary) {
  std::ostringstream out;
  print_store_summary(dir_, out);
  const std::string s = out.str();
  EXPECT_NE(s.find("test/tiny"), std::string::npos) << s;
  EXPECT_NE(s.find("10 (20 traces)"), std::string::npos) << s;
  EXPECT_NE(s.find("logits F16, hidden BF16"), std::string::npos) << s;
  EXPECT_NE(s.find("dec.1"), std::string::npos) << s;
  EXPECT_NE(s.find("complete"), std::string::npos) << s;
}

// Runs f in a child process without root's power to write anywhere (tests run as root in CI
// containers, where chmod alone would not stop a write). Returns f's message, or "CHILD FAILED".
std::string in_unprivileged_child(const fs::path& own, const std::function<std::string()>& f) {
  const fs::path result = own / "result.txt";
  const pid_t pid = ::fork();
  if (pid == 0) {
    std::string msg;
    try {
      if (::geteuid() == 0) {
        fs::permissions(own, fs::perms::all);
        if (::chown(own.c_str(), 65534, 65534) != 0 || ::setgid(65534) != 0 ||
            ::setuid(65534) != 0) {
          ::_exit(2);
        }
      }
      msg = f();
    } catch (const std::exception& e) {
      msg = std::string("unexpected: ") + e.what();
    }
    write_file(result, msg);
    ::_exit(0);
  }
  int status = 0;
  ::waitpid(pid, &status, 0);
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) return "CHILD FAILED";
  return read_file(result);
}

TEST(TraceWriter, UnwritableDirectory) {
  TempDir tmp("unwritable");
  const StoreSettings s = make_settings(DType::kF16, std::nullopt, false, 3);
  const fs::path dir = tmp.path() / "store";
  const std::string msg = in_unprivileged_child(tmp.path(), [&]() -> std::string {
    auto w = TraceWriter::open(dir, s, OpenMode::kCreate);
    add_samples(w.get(), s, 0, 3);
    w->commit_partial();  // shard 0 is committed
    fs::permissions(dir, fs::perms::owner_read | fs::perms::owner_exec);
    try {
      add_samples(w.get(), s, 3, 8);
      w->finish(1.0);
    } catch (const Error& e) {
      return e.what();
    }
    return "no error";
  });
  EXPECT_NE(msg.find(".tmp-shard-00001.safetensors: cannot create: Permission denied"),
            std::string::npos)
      << msg;
  fs::permissions(dir, fs::perms::owner_all);
  const auto problems = verify_store(dir);
  EXPECT_TRUE(problems.empty()) << joined(problems);
  EXPECT_EQ(TraceStore::open(dir).num_samples(), 3);

  // A directory that cannot be created at all.
  const std::string err = error_of(
      [&] { TraceWriter::open(tmp.path() / "result.txt" / "store", s, OpenMode::kCreate); });
  EXPECT_NE(err.find("result.txt"), std::string::npos) << err;
}

// A full disk: the writer thread's failure comes back from the next add()/finish(), names the file,
// and the shards committed before stay a valid store.
TEST(TraceWriter, FullDiskDevFull) {
  if (!fs::exists("/dev/full")) GTEST_SKIP() << "no /dev/full";
  TempDir tmp("devfull");
  const StoreSettings s = make_settings(DType::kF32, DType::kF32, false, 3);
  const fs::path dir = tmp.path() / "store";
  auto w = TraceWriter::open(dir, s, OpenMode::kCreate);
  // The next shard's temporary file writes into /dev/full: every write fails with ENOSPC.
  fs::create_symlink("/dev/full", dir / ".tmp-shard-00001.safetensors");
  std::string err = error_of([&] {
    add_samples(w.get(), s, 0, 12);
    w->finish(1.0);
  });
  EXPECT_NE(err.find(".tmp-shard-00001.safetensors: write failed: No space left on device"),
            std::string::npos)
      << err;
  // The error stays: the writer accepts nothing more.
  EXPECT_FALSE(error_of([&] { w->finish(1.0); }).empty());
  w.reset();
  const auto problems = verify_store(dir);
  EXPECT_TRUE(problems.empty()) << joined(problems);
  EXPECT_EQ(TraceStore::open(dir).num_samples(), 3);
  EXPECT_FALSE(fs::exists(dir / ".tmp-shard-00001.safetensors"));
  // Once there is space again, --resume continues.
  auto r = TraceWriter::open(dir, s, OpenMode::kResume);
  EXPECT_EQ(r->committed_samples(), 3);
  add_samples(r.get(), s, 3, 12);
  r->finish(1.0);
  EXPECT_TRUE(verify_store(dir).empty());
}

// The same with a real filesystem that fills up: a tiny tmpfs (needs the right to mount, else
// skipped; FullDiskDevFull covers the error path without it).
TEST(TraceWriter, FullDiskTmpfs) {
  TempDir tmp("tmpfs");
  const fs::path mnt = tmp.path() / "mnt";
  fs::create_directories(mnt);
  if (::mount("tmpfs", mnt.c_str(), "tmpfs", 0, "size=64k") != 0) {
    GTEST_SKIP() << "cannot mount a tmpfs here (not root or no CAP_SYS_ADMIN)";
  }
  std::string err;
  std::vector<std::string> problems;
  int64_t durable = -1;
  {
    const StoreSettings s = make_settings(DType::kF32, DType::kF32, false, 4);
    const fs::path dir = mnt / "store";
    auto w = TraceWriter::open(dir, s, OpenMode::kCreate);
    err = error_of([&] {
      add_samples(w.get(), s, 0, 400);
      w->finish(1.0);
    });
    w.reset();
    problems = verify_store(dir);
    durable = TraceStore::open(dir).num_samples();
  }
  ::umount(mnt.c_str());
  EXPECT_NE(err.find("No space left on device"), std::string::npos) << err;
  EXPECT_NE(err.find("store/"), std::string::npos) << err;
  EXPECT_TRUE(problems.empty()) << joined(problems);
  EXPECT_GT(durable, 0);
  EXPECT_EQ(durable % 4, 0);
}

#ifdef MOETRACE_CLI
int run_cli(const std::string& args, std::string* out) {
  const std::string cmd = std::string(MOETRACE_CLI) + " " + args + " 2>&1";
  FILE* p = ::popen(cmd.c_str(), "r");
  if (p == nullptr) return -1;
  char buf[4096];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof(buf), p)) > 0) out->append(buf, n);
  const int status = ::pclose(p);
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

TEST_F(Verify, CommandLine) {
  ASSERT_TRUE(fs::exists(MOETRACE_CLI)) << "the moetrace CLI is not built: " << MOETRACE_CLI;
  std::string out;
  ASSERT_EQ(run_cli("verify " + dir_.string(), &out), 0) << out;
  EXPECT_NE(out.find("OK " + dir_.string() + ": 10 samples"), std::string::npos) << out;
  fs::remove(dir_ / "shard-00001.safetensors");
  out.clear();
  EXPECT_EQ(run_cli("verify " + dir_.string(), &out), 1) << out;
  EXPECT_NE(out.find("FAIL " + (dir_ / "shard-00001.safetensors").string() + ": missing"),
            std::string::npos)
      << out;
  EXPECT_NE(out.find("problems found"), std::string::npos) << out;
}
#endif

}  // namespace
}  // namespace moetrace
