// config.json sizes: each bounded, and their products computed in 64 bits with overflow checks
// (issue 15 item 10: num_heads * d_kv overflowed and passed the size check).
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "model/config.h"

namespace moetrace {
namespace {

using json = nlohmann::json;

json tiny_config() {
  std::ifstream in(std::filesystem::path(MOETRACE_TEST_DATA) / "fixtures/tiny-a/model/config.json");
  return json::parse(in);
}

std::string error_of(const json& j) {
  try {
    parse_config(j, "config.json");
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

TEST(ConfigBounds, TinyConfigParses) { EXPECT_EQ(error_of(tiny_config()), ""); }

TEST(ConfigBounds, HeadsTimesKvOverflowIsRefused) {
  json j = tiny_config();
  j["num_heads"] = int64_t{1} << 62;  // * 4 wraps to 0 in 64 bits
  j["d_kv"] = 4;
  const std::string msg = error_of(j);
  EXPECT_NE(msg.find("config.json"), std::string::npos) << msg;
  EXPECT_NE(msg.find("num_heads"), std::string::npos) << msg;

  j["num_heads"] = 65536;  // each alone plausible, the product not
  j["d_kv"] = 65536;
  EXPECT_NE(error_of(j).find("num_heads * d_kv"), std::string::npos) << error_of(j);

  j["num_heads"] = (int64_t{1} << 31) + 1;  // overflows a 32-bit int
  j["d_kv"] = 2;
  EXPECT_NE(error_of(j).find("num_heads"), std::string::npos) << error_of(j);
}

TEST(ConfigBounds, HugeSizesAreRefusedByName) {
  for (const char* key : {"d_kv", "expert_capacity", "relative_attention_num_buckets",
                          "relative_attention_max_distance"}) {
    json j = tiny_config();
    j[key] = int64_t{1} << 62;
    EXPECT_NE(error_of(j).find(key), std::string::npos) << key << ": " << error_of(j);
  }
}

TEST(ConfigBounds, ExpertWeightsProductIsBounded) {
  json j = tiny_config();
  j["num_experts"] = 65536;
  j["d_ff"] = 1 << 20;
  j["d_model"] = 1 << 16;
  EXPECT_NE(error_of(j).find("num_experts * d_ff * d_model"), std::string::npos) << error_of(j);
}

}  // namespace
}  // namespace moetrace
