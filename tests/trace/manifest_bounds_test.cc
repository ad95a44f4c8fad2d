// Counts read from a manifest are bounded before anything is allocated from them (issue 15 item 4:
// num_experts 5e7 made verify take 4.9 GB, 2e9 got it killed, 2^62 made inspect spin).
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <sstream>

#include "core/error.h"
#include "trace/store.h"

namespace moetrace {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

class ManifestBounds : public ::testing::Test {
 protected:
  ManifestBounds() {
    dir_ = fs::temp_directory_path() / ("mt_manifest_bounds_" + std::to_string(::getpid()));
    fs::remove_all(dir_);
    StoreSettings s;
    s.settings = {{"mode", "test"}};
    s.model = {{"id", "test/tiny"}};
    s.command_line = {"moetrace", "collect"};
    s.enc_layers = {1, 3};
    s.num_experts = 4;
    s.d_model = 8;
    s.samples_per_shard = 4;
    s.device = "cpu";
    TraceWriter::open(dir_, s, OpenMode::kCreate)->finish(1.0);
    std::ifstream in(dir_ / "manifest.json");
    manifest_ = json::parse(in);
  }
  ~ManifestBounds() override {
    std::error_code ec;
    fs::remove_all(dir_, ec);
  }
  void write(const json& m) {
    std::ofstream out(dir_ / "manifest.json", std::ios::trunc);
    out << m.dump();
  }
  // Every reader of the manifest: one line naming the manifest and the field.
  void expect_refused(const std::string& field) {
    const std::vector<std::string> problems = verify_store(dir_);
    ASSERT_EQ(problems.size(), 1u);
    EXPECT_NE(problems[0].find("manifest.json"), std::string::npos) << problems[0];
    EXPECT_NE(problems[0].find(field), std::string::npos) << problems[0];
    EXPECT_EQ(problems[0].find('\n'), std::string::npos) << problems[0];
    for (int k = 0; k < 2; ++k) {
      try {
        if (k == 0) {
          TraceStore::open(dir_);
        } else {
          std::ostringstream os;
          print_store_summary(dir_, os);
        }
        ADD_FAILURE() << "expected an Error for " << field;
      } catch (const Error& e) {
        EXPECT_NE(std::string(e.what()).find(field), std::string::npos) << e.what();
      }
    }
  }
  fs::path dir_;
  json manifest_;
};

TEST_F(ManifestBounds, UnchangedStoreVerifies) { EXPECT_TRUE(verify_store(dir_).empty()); }

TEST_F(ManifestBounds, HugeNumExpertsIsRefused) {
  for (int64_t e : {int64_t{50000000}, int64_t{2000000000}, int64_t{1} << 62}) {
    json m = manifest_;
    m["num_experts"] = e;
    write(m);
    expect_refused("num_experts");
  }
}

TEST_F(ManifestBounds, HugeDModelIsRefused) {
  json m = manifest_;
  m["d_model"] = int64_t{1} << 62;
  write(m);
  expect_refused("d_model");
}

TEST_F(ManifestBounds, LayersTimesExpertsIsBounded) {
  json m = manifest_;
  json enc = json::array();
  for (int b = 0; b < 1000; ++b) enc.push_back(b);
  m["layers"]["encoder"] = enc;
  m["num_experts"] = 65536;  // each alone allowed; 1000 × 65536 counts are not
  write(m);
  expect_refused("(layer, expert) counts");
}

TEST_F(ManifestBounds, HugeSampleCountsAreRefused) {
  json m = manifest_;
  m["samples_per_shard"] = int64_t{1} << 62;
  write(m);
  expect_refused("samples_per_shard");
}

TEST_F(ManifestBounds, ShardCountsCannotOverflow) {
  json m = manifest_;
  json shard = {{"file", "shard-00000.safetensors"}, {"first_sample", 0},
                {"num_samples", INT64_MAX},          {"num_tokens", 0},
                {"num_decoder_tokens", 0},           {"bytes", 8},
                {"sha256", std::string(64, '0')}};
  m["shards"] = json::array({shard, shard});
  m["shards"][1]["first_sample"] = INT64_MAX;
  write(m);
  try {
    TraceStore::open(dir_);
    ADD_FAILURE() << "expected an Error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("num_samples"), std::string::npos) << e.what();
  }
}

// Found by fuzz_trace_store: a data_parallel rank field of another type threw a json type_error
// out of verify_store (the CLI's verify aborted) instead of becoming a problem line.
TEST_F(ManifestBounds, DataParallelFieldsOfAnotherTypeAreProblems) {
  for (const char* key : {"rank", "dir", "first_sample", "num_samples"}) {
    json m = manifest_;
    m["data_parallel"] = {{"world_size", 2},
                          {"ranks",
                           {{{"rank", 0},
                             {"dir", "ranks/rank-00000-of-00002"},
                             {"first_sample", 0},
                             {"num_samples", 0}},
                            {{"rank", 1},
                             {"dir", "ranks/rank-00001-of-00002"},
                             {"first_sample", 0},
                             {"num_samples", 0}}}}};
    m["data_parallel"]["ranks"][0][key] = json::array({"x"});
    write(m);
    std::vector<std::string> problems;
    ASSERT_NO_THROW(problems = verify_store(dir_)) << key;
    ASSERT_FALSE(problems.empty()) << key;
    EXPECT_NE(problems[0].find("data_parallel.ranks[0]"), std::string::npos) << problems[0];
  }
}

}  // namespace
}  // namespace moetrace
