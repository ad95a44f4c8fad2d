// LmConfig: both spellings of config.json (the Hub's and transformers 5.x's) give the same config,
// transformers' defaults and sparse-layer rule, and one error line naming config.json and the
// field for every bad or missing field.
#include "model/lm/lm_config.h"

#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "core/error.h"

namespace moetrace {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;
const fs::path kFixtures = fs::path(MOETRACE_TEST_DATA) / "fixtures_lm";

json read(const fs::path& p) {
  std::ifstream in(p);
  return json::parse(in);
}

// The error message of parsing j ("" when it parses).
std::string error_of(const json& j) {
  try {
    parse_lm_config(j, "config.json");
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

json minimal(const char* model_type) {
  json j = {{"model_type", model_type}, {"vocab_size", 100},       {"hidden_size", 32},
            {"intermediate_size", 64},  {"num_hidden_layers", 4},  {"num_attention_heads", 4},
            {"num_key_value_heads", 2}, {"num_experts_per_tok", 2}};
  j[std::string(model_type) == "mixtral" ? "num_local_experts" : "num_experts"] = 8;
  if (std::string(model_type).rfind("qwen", 0) == 0) j["moe_intermediate_size"] = 16;
  if (std::string(model_type) == "qwen2_moe") j["shared_expert_intermediate_size"] = 24;
  return j;
}

TEST(LmConfig, HubAndTransformers5SpellingsOfEveryFixtureAgree) {
  for (const char* f : {"olmoe", "mixtral", "qwen2_moe", "qwen3_moe"}) {
    const json a = read(kFixtures / f / "model/config.json");
    const json b = read(kFixtures / f / "model_hub/config.json");
    // The two files really spell it differently.
    EXPECT_TRUE(a.contains("rope_parameters") && a.contains("dtype")) << f;
    EXPECT_TRUE(b.contains("rope_theta") && b.contains("torch_dtype")) << f;
    const LmConfig ca = parse_lm_config(a, "model/config.json");
    const LmConfig cb = parse_lm_config(b, "model_hub/config.json");
    EXPECT_TRUE(ca == cb) << f << ": " << ca.summary() << " vs " << cb.summary();
  }
}

TEST(LmConfig, FixtureValuesAsTransformersReadsThem) {
  const LmConfig q2 = load_lm_config(kFixtures / "qwen2_moe/model_hub/config.json");
  EXPECT_EQ(q2.family, LmFamily::kQwen2Moe);
  EXPECT_EQ(q2.rope_type, RopeType::kLinear);
  EXPECT_DOUBLE_EQ(q2.rope_factor, 2.0);
  EXPECT_TRUE(q2.qkv_bias);  // implied: the Hub's Qwen1.5-MoE config has no qkv_bias
  EXPECT_FALSE(q2.o_bias);
  EXPECT_EQ(q2.sparse_layers(), (std::vector<int>{0, 2}));  // mlp_only_layers [1]
  EXPECT_EQ(q2.top_k, 4);
  EXPECT_FALSE(q2.norm_topk_prob);
  const LmConfig mx = load_lm_config(kFixtures / "mixtral/model/config.json");
  EXPECT_TRUE(mx.norm_topk_prob);  // always, whatever the file says
  EXPECT_EQ(mx.head_dim, 16);      // explicit, != hidden / heads
  EXPECT_DOUBLE_EQ(mx.rope_theta, 1e6);
  const LmConfig ol = load_lm_config(kFixtures / "olmoe/model/config.json");
  EXPECT_EQ(ol.qk_norm, QkNorm::kFull);
  EXPECT_GT(ol.clip_qkv, 0);
  EXPECT_EQ(load_lm_config(kFixtures / "qwen3_moe/model/config.json").qk_norm, QkNorm::kPerHead);
}

TEST(LmConfig, Defaults) {
  const LmConfig mx = parse_lm_config(minimal("mixtral"), "c");
  EXPECT_DOUBLE_EQ(mx.rope_theta, 1e6);  // MixtralConfig.default_theta
  EXPECT_DOUBLE_EQ(mx.rms_norm_eps, 1e-5);
  EXPECT_EQ(mx.head_dim, 8);
  EXPECT_EQ(mx.moe_intermediate_size, 64);  // the experts are intermediate_size wide
  const LmConfig q3 = parse_lm_config(minimal("qwen3_moe"), "c");
  EXPECT_DOUBLE_EQ(q3.rope_theta, 10000.0);
  EXPECT_DOUBLE_EQ(q3.rms_norm_eps, 1e-6);
  EXPECT_FALSE(q3.qkv_bias);
  EXPECT_EQ(q3.dtype, "float32");
  json j = minimal("qwen3_moe");
  j.erase("num_key_value_heads");
  EXPECT_EQ(parse_lm_config(j, "c").num_key_value_heads, 4);  // Qwen3MoeConfig's default
}

TEST(LmConfig, RopeSpellings) {
  json hub = minimal("olmoe");
  hub["rope_theta"] = 5000.0;
  hub["rope_scaling"] = {{"type", "linear"}, {"factor", 4.0}};
  json v5 = minimal("olmoe");
  v5["rope_parameters"] = {{"rope_type", "linear"}, {"factor", 4.0}, {"rope_theta", 5000.0}};
  const LmConfig a = parse_lm_config(hub, "c"), b = parse_lm_config(v5, "c");
  EXPECT_TRUE(a == b);
  EXPECT_EQ(a.rope_type, RopeType::kLinear);
  EXPECT_DOUBLE_EQ(a.rope_theta, 5000.0);
  json none = minimal("olmoe");
  none["rope_scaling"] = nullptr;
  EXPECT_EQ(parse_lm_config(none, "c").rope_type, RopeType::kDefault);
}

TEST(LmConfig, DtypeAndExpertCountSpellings) {
  json a = minimal("qwen3_moe"), b = minimal("qwen3_moe");
  a["torch_dtype"] = "bfloat16";
  b["dtype"] = "bfloat16";
  b.erase("num_experts");
  b["num_local_experts"] = 8;
  EXPECT_TRUE(parse_lm_config(a, "c") == parse_lm_config(b, "c"));
  EXPECT_EQ(parse_lm_config(a, "c").dtype, "bfloat16");
}

TEST(LmConfig, SparseLayerRule) {
  json j = minimal("qwen2_moe");
  j["num_hidden_layers"] = 6;
  j["decoder_sparse_step"] = 2;
  j["mlp_only_layers"] = {3};
  EXPECT_EQ(parse_lm_config(j, "c").sparse_layers(), (std::vector<int>{1, 5}));
  EXPECT_EQ(parse_lm_config(minimal("olmoe"), "c").sparse_layers(), (std::vector<int>{0, 1, 2, 3}));
}

TEST(LmConfig, EosAsIntOrList) {
  json j = minimal("qwen3_moe");
  j["eos_token_id"] = {7, 9};
  EXPECT_EQ(parse_lm_config(j, "c").eos_token_ids, (std::vector<int64_t>{7, 9}));
  j["eos_token_id"] = 5;
  EXPECT_EQ(parse_lm_config(j, "c").eos_token_ids, (std::vector<int64_t>{5}));
}

struct Bad {
  const char* model_type;
  const char* field;  // set (or erased when value is null)
  json value;
  const char* expect;  // a piece of the message besides config.json
};

class LmConfigBad : public ::testing::TestWithParam<Bad> {};

TEST_P(LmConfigBad, OneLineNamingTheField) {
  const Bad b = GetParam();
  json j = minimal(b.model_type);
  if (b.value.is_null()) {
    j.erase(b.field);
  } else {
    j[b.field] = b.value;
  }
  const std::string msg = error_of(j);
  ASSERT_FALSE(msg.empty()) << b.field << " = " << b.value.dump() << " was accepted";
  EXPECT_EQ(msg.rfind("config.json: ", 0), 0u) << msg;
  EXPECT_NE(msg.find(b.expect), std::string::npos) << msg;
  EXPECT_EQ(msg.find('\n'), std::string::npos) << msg;
}

INSTANTIATE_TEST_SUITE_P(
    Fields, LmConfigBad,
    ::testing::Values(
        Bad{"olmoe", "vocab_size", nullptr, "'vocab_size' is missing"},
        Bad{"qwen3_moe", "moe_intermediate_size", nullptr, "'moe_intermediate_size' is missing"},
        Bad{"qwen2_moe", "shared_expert_intermediate_size", nullptr,
            "'shared_expert_intermediate_size' is missing"},
        Bad{"mixtral", "num_local_experts", nullptr, "'num_experts' (or 'num_local_experts')"},
        Bad{"olmoe", "hidden_size", "32", "'hidden_size' must be an integer"},
        Bad{"olmoe", "num_experts_per_tok", 9, "'num_experts_per_tok' = 9"},
        Bad{"olmoe", "num_key_value_heads", 3, "not a multiple of num_key_value_heads"},
        Bad{"olmoe", "rms_norm_eps", "tiny", "'rms_norm_eps' must be a number"},
        Bad{"olmoe", "rope_scaling", json{{"type", "yarn"}, {"factor", 2.0}},
            "'rope_scaling.rope_type' = 'yarn' is not supported"},
        Bad{"qwen3_moe", "rope_parameters", json{{"rope_type", "linear"}},
            "'rope_parameters.factor'"},
        Bad{"qwen3_moe", "num_local_experts", 16, "disagree"},
        Bad{"mixtral", "hidden_act", "gelu", "'hidden_act' = 'gelu'"},
        Bad{"qwen2_moe", "use_sliding_window", true, "use_sliding_window"},
        Bad{"qwen2_moe", "mlp_only_layers", json{1, 9}, "mlp_only_layers"},
        Bad{"olmoe", "eos_token_id", 100, "'eos_token_id' = 100"},
        Bad{"olmoe", "torch_dtype", "int8", "'dtype' (torch_dtype) = 'int8'"},
        Bad{"olmoe", "head_dim", 16, "head_dim * num_attention_heads"},
        Bad{"olmoe", "model_type", "switch_transformers", "'model_type' = 'switch_transformers'"},
        Bad{"olmoe", "model_type", nullptr, "'model_type' is missing"}));

TEST(LmConfig, FileErrorsNameTheFile) {
  const fs::path p = fs::temp_directory_path() / "lm_config_test_bad.json";
  std::ofstream(p) << "{ not json";
  try {
    load_lm_config(p);
    FAIL() << "accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(p.string()), std::string::npos) << e.what();
  }
  fs::remove(p);
}

}  // namespace
}  // namespace moetrace
