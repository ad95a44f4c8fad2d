// The manifest's "fidelity" object (collect --audit): written by set_store_fidelity, read back
// bound-checked by every reader (manifest_fidelity, verify_store, the summary behind `inspect`).
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <functional>
#include <sstream>

#include "core/error.h"
#include "trace/schema.h"
#include "trace/store.h"

namespace moetrace {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

std::string read_text(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

Fidelity measured() {
  Fidelity f;
  f.measured = true;
  f.precision = "bf16";
  f.fraction = 0.25;
  f.samples = 3;
  f.seconds = 1.5;
  f.per_layer = {{"enc.1", FidelityCounts{100, 97, 0.125}},
                 {"enc.3", FidelityCounts{100, 90, 0.5}}};
  f.total = FidelityCounts{200, 187, 0.5};
  return f;
}

class FidelityManifest : public ::testing::Test {
 protected:
  FidelityManifest() {
    dir_ = fs::temp_directory_path() / ("mt_fidelity_manifest_" + std::to_string(::getpid()));
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
    auto w = TraceWriter::open(dir_, s, OpenMode::kCreate);
    std::vector<int32_t> ids = {5, 6, 1}, expert = {0, 1, 2};
    std::vector<uint8_t> dropped = {0, 0, 0};
    std::vector<float> logits(12, 0.f), gate(3, 0.25f);
    for (int k = 0; k < 5; ++k) {
      SampleRecord r;
      r.sample_id = "tiny/default/test/" + std::to_string(k);
      r.dataset = std::string("tiny");
      r.row = k;
      r.token_ids = ids;
      for (int l = 0; l < 2; ++l)
        r.enc.push_back(
            LayerRecord{logits.data(), expert.data(), dropped.data(), gate.data(), nullptr});
      w->add(r);
    }
    w->finish(1.0);
  }
  ~FidelityManifest() override {
    std::error_code ec;
    fs::remove_all(dir_, ec);
  }
  json manifest() const { return json::parse(read_text(dir_ / "manifest.json")); }
  void write(const json& m) {
    std::ofstream out(dir_ / "manifest.json", std::ios::trunc);
    out << m.dump();
  }
  // A fidelity object changed by `edit` is one line naming the field from verify, the summary
  // and manifest_fidelity alike.
  void expect_refused(const std::function<void(json&)>& edit, const std::string& field) {
    set_store_fidelity(dir_, measured());
    json m = manifest();
    edit(m["fidelity"]);
    write(m);
    const std::vector<std::string> problems = verify_store(dir_);
    ASSERT_EQ(problems.size(), 1u) << field;
    EXPECT_NE(problems[0].find("fidelity"), std::string::npos) << problems[0];
    EXPECT_NE(problems[0].find(field), std::string::npos) << problems[0];
    EXPECT_EQ(problems[0].find('\n'), std::string::npos) << problems[0];
    try {
      std::ostringstream os;
      print_store_summary(dir_, os);
      ADD_FAILURE() << "the summary accepted a bad " << field;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(field), std::string::npos) << e.what();
    }
    EXPECT_THROW(manifest_fidelity(m, "m"), Error) << field;
  }
  fs::path dir_;
};

TEST_F(FidelityManifest, RoundTripKeepsEveryOtherFieldAndGoesLast) {
  const std::string before = read_text(dir_ / "manifest.json");
  EXPECT_FALSE(manifest_fidelity(manifest(), "m").has_value());
  set_store_fidelity(dir_, measured());
  const std::string after = read_text(dir_ / "manifest.json");
  // Everything before the new object is byte for byte what the writer wrote.
  const size_t cut = before.rfind("\n}");
  ASSERT_NE(cut, std::string::npos);
  EXPECT_EQ(after.substr(0, cut), before.substr(0, cut));
  EXPECT_NE(after.find("\"fidelity\": {\n    \"status\": \"measured\""), std::string::npos)
      << after;

  const std::optional<Fidelity> f = manifest_fidelity(manifest(), "m");
  ASSERT_TRUE(f.has_value());
  EXPECT_TRUE(f->measured);
  EXPECT_EQ(f->precision, "bf16");
  EXPECT_EQ(f->reference, "fp32");
  EXPECT_EQ(f->fraction, 0.25);
  EXPECT_EQ(f->samples, 3);
  ASSERT_EQ(f->per_layer.size(), 2u);
  EXPECT_EQ(f->per_layer[1].first, "enc.3");
  EXPECT_EQ(f->per_layer[1].second.top1_agree, 90);
  EXPECT_EQ(f->total.max_logit_error, 0.5);
  EXPECT_DOUBLE_EQ(manifest()["fidelity"]["total"]["top1_agreement"].get<double>(), 0.935);
  EXPECT_TRUE(verify_store(dir_).empty());
  EXPECT_NO_THROW(TraceStore::open(dir_));

  // Replacing it leaves one object; a skipped one holds its reason.
  Fidelity skipped;
  skipped.reason = "the CPU engine computes in fp32";
  skipped.precision = "fp32";
  skipped.fraction = 0.01;
  set_store_fidelity(dir_, skipped);
  const std::string text = read_text(dir_ / "manifest.json");
  EXPECT_EQ(text.find("\"fidelity\""), text.rfind("\"fidelity\""));
  const std::optional<Fidelity> s = manifest_fidelity(manifest(), "m");
  ASSERT_TRUE(s.has_value());
  EXPECT_FALSE(s->measured);
  EXPECT_EQ(s->reason, "the CPU engine computes in fp32");
  EXPECT_FALSE(manifest()["fidelity"].contains("per_layer"));
  EXPECT_TRUE(verify_store(dir_).empty());
}

TEST_F(FidelityManifest, SummaryShowsItInTextAndJson) {
  std::ostringstream none;
  print_store_summary(dir_, none);
  EXPECT_NE(none.str().find("fidelity        not audited"), std::string::npos) << none.str();
  EXPECT_TRUE(store_summary_json(dir_)["fidelity"].is_null());

  set_store_fidelity(dir_, measured());
  const json j = store_summary_json(dir_);
  EXPECT_EQ(j["fidelity"]["status"], "measured");
  EXPECT_EQ(j["fidelity"]["per_layer"]["enc.3"]["top1_agree"], 90);
  EXPECT_EQ(j["fidelity"]["total"]["tokens"], 200);
  std::ostringstream text;
  print_store_summary(dir_, text);
  const std::string t = text.str();
  EXPECT_NE(t.find("fidelity        bf16 vs an fp32 re-run of 3 samples (200 tokens, --audit "
                   "0.25): top-1 agreement 93.500%, max |logit error| 0.5000"),
            std::string::npos)
      << t;
  EXPECT_NE(t.find("  enc.1                  100     97.000%            0.1250"), std::string::npos)
      << t;
  const size_t fid = t.find("fidelity        ");
  EXPECT_LT(t.find("  enc.1 ", fid), t.find("  enc.3 ", fid));
  EXPECT_GT(fid, t.find("per layer       "));  // the last block of the summary

  Fidelity skipped;
  skipped.reason = "--precision fp32: the stored routing is fp32's";
  skipped.precision = "fp32";
  set_store_fidelity(dir_, skipped);
  std::ostringstream s;
  print_store_summary(dir_, s);
  EXPECT_NE(s.str().find("fidelity        fp32: audit skipped (--precision fp32: the stored "
                         "routing is fp32's)"),
            std::string::npos)
      << s.str();
}

TEST_F(FidelityManifest, VerifyRefusesMoreAuditedSamplesThanTheStoreHolds) {
  Fidelity f = measured();
  f.samples = 6;  // the store holds 5
  set_store_fidelity(dir_, f);
  const std::vector<std::string> problems = verify_store(dir_);
  ASSERT_EQ(problems.size(), 1u);
  EXPECT_NE(problems[0].find("fidelity.samples is 6, more than the store's 5 samples"),
            std::string::npos)
      << problems[0];
}

TEST_F(FidelityManifest, OnlyACompleteStoreTakesOne) {
  json m = manifest();
  m["complete"] = false;
  write(m);
  EXPECT_THROW(set_store_fidelity(dir_, measured()), Error);
}

TEST_F(FidelityManifest, AnInconsistentObjectIsOneLineNamingTheField) {
  expect_refused([](json& f) { f = "measured"; }, "must be an object");
  expect_refused([](json& f) { f["status"] = "maybe"; }, "status");
  expect_refused([](json& f) { f.erase("precision"); }, "precision");
  expect_refused([](json& f) { f["fraction"] = 2; }, "fraction");
  expect_refused([](json& f) { f["samples"] = -1; }, "samples");
  expect_refused([](json& f) { f["seconds"] = "1"; }, "seconds");
  expect_refused([](json& f) { f["per_layer"]["enc.1"]["top1_agree"] = 101; }, "top1_agree");
  expect_refused([](json& f) { f["per_layer"]["enc.1"]["top1_agreement"] = 0.5; },
                 "top1_agreement");
  expect_refused([](json& f) { f["per_layer"]["enc.1"]["max_logit_error"] = -1; },
                 "max_logit_error");
  expect_refused([](json& f) { f["per_layer"]["enc.1"]["tokens"] = 1e300; }, "tokens");
  expect_refused([](json& f) { f["per_layer"].erase("enc.3"); }, "per_layer");
  expect_refused(
      [](json& f) {
        f["per_layer"]["enc.2"] = f["per_layer"]["enc.3"];
        f["per_layer"].erase("enc.3");
      },
      "enc.3");
  expect_refused([](json& f) { f["per_layer"]["enc.5"] = f["per_layer"]["enc.3"]; }, "per_layer");
  expect_refused(
      [](json& f) {
        f["total"]["tokens"] = 201;
        f["total"]["top1_agreement"] = 187.0 / 201;
      },
      "total");
  expect_refused([](json& f) { f["total"]["max_logit_error"] = 0.25; }, "total");
  expect_refused(
      [](json& f) {
        f = {{"status", "skipped"}, {"reference", "fp32"}, {"precision", "fp32"}, {"fraction", 0}};
      },
      "reason");
}

TEST(MergeFidelity, RanksMeasuredAlikeAddUpElseNone) {
  Fidelity a = measured(), b = measured();
  b.samples = 2;
  b.seconds = 4;
  b.per_layer[0].second = FidelityCounts{50, 50, 0.75};
  b.total = FidelityCounts{150, 140, 0.75};
  const std::optional<Fidelity> m = trace::merge_fidelity({a, b});
  ASSERT_TRUE(m.has_value());
  EXPECT_EQ(m->samples, 5);
  EXPECT_EQ(m->seconds, 4.0);
  EXPECT_EQ(m->per_layer[0].second.tokens, 150);
  EXPECT_EQ(m->per_layer[0].second.top1_agree, 147);
  EXPECT_EQ(m->per_layer[0].second.max_logit_error, 0.75);
  EXPECT_EQ(m->per_layer[1].second.top1_agree, 180);
  EXPECT_EQ(m->total.tokens, 350);
  EXPECT_EQ(m->total.top1_agree, 327);
  EXPECT_EQ(m->total.max_logit_error, 0.75);

  Fidelity skipped;
  skipped.reason = "cpu";
  EXPECT_FALSE(trace::merge_fidelity({a, std::nullopt}).has_value());
  EXPECT_FALSE(trace::merge_fidelity({a, skipped}).has_value());
  b.precision = "mixed";
  EXPECT_FALSE(trace::merge_fidelity({a, b}).has_value());
  const std::optional<Fidelity> s = trace::merge_fidelity({skipped, skipped});
  ASSERT_TRUE(s.has_value());
  EXPECT_FALSE(s->measured);
  EXPECT_EQ(s->reason, "cpu");
}

}  // namespace
}  // namespace moetrace
