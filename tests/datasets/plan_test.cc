#include "data/plan.h"

#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <regex>
#include <set>

#include "core/error.h"
#include "data/locate.h"

namespace moetrace {
namespace {

namespace fs = std::filesystem;
const fs::path kData = MOETRACE_TEST_DATA;

PlanOptions demo_options(uint64_t seed = 1) {
  PlanOptions o;
  o.datasets = "demo";
  o.data_roots = {data::demo_data_root()};
  o.seed = seed;
  o.search_hf_cache = false;
  return o;
}

const std::vector<PlannedSample>& demo_plan() {
  static const std::vector<PlannedSample> plan = build_plan(demo_options(), nullptr);
  return plan;
}

std::map<std::string, std::vector<const PlannedSample*>> by_dataset(
    const std::vector<PlannedSample>& plan) {
  std::map<std::string, std::vector<const PlannedSample*>> out;
  for (const auto& s : plan) out[s.dataset].push_back(&s);
  return out;
}

TEST(Plan, DemoPlanCoversTheDemoDatasets) {
  PlanStats stats;
  auto plan = build_plan(demo_options(), &stats);
  EXPECT_GE(plan.size(), 1000u);
  EXPECT_TRUE(stats.missing.empty());
  auto groups = by_dataset(plan);
  EXPECT_EQ(groups.size(), 10u);
  EXPECT_EQ(groups["glue/mrpc"].size(), 150u);
  EXPECT_EQ(groups["glue/qnli"].size(), 150u);
  EXPECT_EQ(groups["glue/stsb"].size(), 150u);
  EXPECT_EQ(groups["glue/sst2"].size(), 150u);
  EXPECT_EQ(groups["glue/rte"].size(), 150u);
  EXPECT_EQ(groups["super_glue/cb"].size(), 56u);  // all 56 rows: quota 100
  EXPECT_EQ(groups["super_glue/rte"].size(), 100u);
  EXPECT_EQ(groups["ag_news"].size(), 150u);
  EXPECT_EQ(groups["tweet_eval/emotion"].size(), 100u);
  EXPECT_EQ(groups["wikitext"].size(), 200u);
  for (const auto& d : stats.datasets) {
    EXPECT_EQ(d.status, "planned") << d.dataset << " " << d.error;
    EXPECT_FALSE(d.files.empty()) << d.dataset;
  }
}

TEST(Plan, SampleIdsAreUniqueAndNamed) {
  std::set<std::string> ids;
  const std::regex id_re(R"([^/]+/[^/]+/[^/]+/\d+)");
  for (const auto& s : demo_plan()) {
    EXPECT_TRUE(ids.insert(s.sample_id).second) << s.sample_id;
    EXPECT_TRUE(std::regex_match(s.sample_id, id_re)) << s.sample_id;
    EXPECT_TRUE(s.sample_id.ends_with("/" + std::to_string(s.row))) << s.sample_id;
  }
  auto g = by_dataset(demo_plan());
  EXPECT_TRUE(g["glue/mrpc"][0]->sample_id.starts_with("glue/mrpc/validation/"));
  EXPECT_TRUE(g["glue/rte"][0]->sample_id.starts_with("glue/rte/validation/"));
  EXPECT_TRUE(g["super_glue/rte"][0]->sample_id.starts_with("super_glue/rte/validation/"));
  EXPECT_TRUE(g["ag_news"][0]->sample_id.starts_with("ag_news/default/test/"));
}

// The right fields in the prompts: both sentences of every pair, from the original column names.
TEST(Plan, PromptsCarryEveryFieldOfThePairs) {
  const std::regex mrpc(R"(mrpc sentence1: \S.* sentence2: \S.*)");
  const std::regex stsb(R"(stsb sentence1: \S.* sentence2: \S.*)");
  const std::regex qnli(R"(qnli question: \S.* sentence: \S.*)");
  const std::regex rte(R"(rte sentence1: \S.* sentence2: \S.*)");
  const std::regex cb(R"(cb hypothesis: \S.* premise: \S.*)");
  const std::regex srte(R"(rte hypothesis: \S.* premise: \S.*)");
  const std::map<std::string, const std::regex*> want = {
      {"glue/mrpc", &mrpc}, {"glue/stsb", &stsb},   {"glue/qnli", &qnli},
      {"glue/rte", &rte},   {"super_glue/cb", &cb}, {"super_glue/rte", &srte}};
  for (const auto& s : demo_plan()) {
    auto it = want.find(s.dataset);
    if (it != want.end()) {
      EXPECT_TRUE(std::regex_match(s.text, *it->second)) << s.sample_id << ": " << s.text;
    }
    if (s.dataset == "glue/sst2") {
      EXPECT_TRUE(s.text.starts_with("sst2 sentence: ")) << s.text;
    }
    if (s.dataset == "ag_news") {
      EXPECT_TRUE(s.text.starts_with("classify topic: ")) << s.text;
    }
    if (s.dataset == "wikitext") {
      EXPECT_TRUE(s.text.starts_with("summarize: ")) << s.text;
    }
  }
  // The first MRPC dev row, as published, appears verbatim when sampled.
  for (const auto& s : demo_plan()) {
    if (s.sample_id == "glue/mrpc/validation/0") {
      EXPECT_EQ(
          s.text,
          "mrpc sentence1: He said the foodservice pie business doesn't fit the company's "
          "long-term "
          "growth strategy. sentence2: \"The foodservice pie business does not fit our long-term "
          "growth strategy.");
    }
  }
}

TEST(Plan, RowsAreDrawnAtRandomNotTheFirstN) {
  auto g = by_dataset(demo_plan());
  int64_t max_row = 0, min_row = 1 << 30;
  for (const auto* s : g["glue/mrpc"]) {
    max_row = std::max(max_row, s->row);
    min_row = std::min(min_row, s->row);
  }
  EXPECT_GT(max_row, 300);  // 150 of 408 rows
  // The dataset order is shuffled and the datasets interleaved.
  std::set<std::string> first10;
  for (size_t i = 0; i < 10; ++i) first10.insert(demo_plan()[i].dataset);
  EXPECT_EQ(first10.size(), 10u);
}

TEST(Plan, ReproducibleAndIndependentOfThreads) {
  auto o1 = demo_options();
  o1.threads = 1;
  auto o8 = demo_options();
  o8.threads = 8;
  auto a = build_plan(o1, nullptr);
  auto b = build_plan(o8, nullptr);
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) {
    EXPECT_EQ(a[i].sample_id, b[i].sample_id);
    EXPECT_EQ(a[i].text, b[i].text);
  }
  ASSERT_EQ(a.size(), demo_plan().size());
  for (size_t i = 0; i < a.size(); ++i) EXPECT_EQ(a[i].sample_id, demo_plan()[i].sample_id);
  auto other = build_plan(demo_options(2), nullptr);
  size_t same = 0;
  for (size_t i = 0; i < std::min(other.size(), a.size()); ++i)
    same += other[i].sample_id == a[i].sample_id;
  EXPECT_LT(same, a.size() / 10);
}

TEST(Plan, ShortAndEmptyTextsAreSkippedAndCounted) {
  PlanStats stats;
  auto o = demo_options();
  o.datasets = "wikitext";
  build_plan(o, &stats);
  ASSERT_EQ(stats.datasets.size(), 1u);
  const auto& w = stats.datasets[0];
  EXPECT_GT(w.skipped.at("too short"), 0);  // " = = Description = = " headings (min_chars 20)
  EXPECT_EQ(w.rows, w.eligible + w.skipped.at("too short"));
  EXPECT_GT(stats.skipped, 0);
}

TEST(Plan, MaxSamplesCutsTheSamePlan) {
  auto o = demo_options();
  o.max_samples = 100;
  auto cut = build_plan(o, nullptr);
  ASSERT_EQ(cut.size(), 100u);
  for (size_t i = 0; i < cut.size(); ++i) EXPECT_EQ(cut[i].sample_id, demo_plan()[i].sample_id);
}

TEST(Plan, TemplateOverride) {
  auto o = demo_options();
  o.datasets = "glue/mrpc";
  o.template_overrides["glue/mrpc"] = "paraphrase? {sentence1} || {sentence2}";
  auto plan = build_plan(o, nullptr);
  ASSERT_EQ(plan.size(), 150u);
  EXPECT_TRUE(plan[0].text.starts_with("paraphrase? ")) << plan[0].text;
  EXPECT_NE(plan[0].text.find(" || "), std::string::npos);
  o.template_overrides = {{"no/such", "x"}};
  EXPECT_THROW(build_plan(o, nullptr), Error);
}

TEST(Plan, MissingDatasetsAreReportedNotFatal) {
  PlanStats stats;
  auto o = demo_options();
  o.datasets = "glue/mrpc,imdb,squad";
  auto plan = build_plan(o, &stats);
  EXPECT_EQ(plan.size(), 150u);
  EXPECT_EQ(stats.missing.size(), 2u);
  o.datasets = "imdb,squad";
  EXPECT_THROW(build_plan(o, nullptr), Error);  // none present
}

TEST(Plan, UnreadableFileSkipsItsDatasetOnly) {
  const fs::path root = fs::temp_directory_path() / "mt_plan_bad_root";
  fs::remove_all(root);
  fs::create_directories(root / "nyu-mll/glue/sst2");
  fs::create_directories(root / "nyu-mll/glue/mrpc");
  fs::copy_file(kData / "parquet-testing/bad_data/PARQUET-1481.parquet",
                root / "nyu-mll/glue/sst2/validation-00000-of-00001.parquet");
  fs::copy_file(kData / "glue/MRPC/dev.tsv", root / "nyu-mll/glue/mrpc/validation.tsv");
  PlanOptions o;
  o.datasets = "glue/sst2,glue/mrpc";
  o.data_roots = {root};
  o.search_hf_cache = false;
  PlanStats stats;
  auto plan = build_plan(o, &stats);
  EXPECT_EQ(plan.size(), 150u);
  for (const auto& d : stats.datasets) {
    if (d.dataset == "glue/sst2") {
      EXPECT_EQ(d.status, "error");
      EXPECT_NE(d.error.find("sst2/validation-00000-of-00001.parquet"), std::string::npos)
          << d.error;
    }
  }
  fs::remove_all(root);
}

TEST(Locate, HubLayoutsAndTheHfCache) {
  const fs::path cache = fs::temp_directory_path() / "mt_hf_cache";
  fs::remove_all(cache);
  const fs::path snap = cache / "datasets--nyu-mll--glue/snapshots/0123abc";
  fs::create_directories(snap / "mrpc");
  fs::create_directories(cache / "datasets--nyu-mll--glue/refs");
  std::ofstream(cache / "datasets--nyu-mll--glue/refs/main") << "0123abc";
  fs::copy_file(kData / "glue/MRPC/dev.tsv", snap / "mrpc/validation-00000-of-00001.tsv");
  std::ofstream(snap / "mrpc/train-00000-of-00001.tsv") << "x\n";
  ::setenv("HF_HUB_CACHE", cache.c_str(), 1);
  data::Catalog catalog = data::Catalog::builtin();
  auto found = data::locate(*catalog.find("glue/mrpc"), {}, true);
  ASSERT_TRUE(found.has_value());
  EXPECT_EQ(found->repo_dir, snap);
  ASSERT_EQ(found->files.size(), 1u);
  EXPECT_EQ(found->files[0].filename(), "validation-00000-of-00001.tsv");
  EXPECT_FALSE(data::locate(*catalog.find("glue/mrpc"), {}, false).has_value());
  ::unsetenv("HF_HUB_CACHE");
  fs::remove_all(cache);

  // data/<split>-* and <config>/<split>/ folders.
  const fs::path root = fs::temp_directory_path() / "mt_locate_root";
  fs::remove_all(root);
  fs::create_directories(root / "stanfordnlp/imdb/data");
  std::ofstream(root / "stanfordnlp/imdb/data/test-00000-of-00002.jsonl") << "{}\n";
  std::ofstream(root / "stanfordnlp/imdb/data/test-00001-of-00002.jsonl") << "{}\n";
  std::ofstream(root / "stanfordnlp/imdb/data/train-00000-of-00001.jsonl") << "{}\n";
  auto imdb = data::locate(*catalog.find("imdb"), {root}, false);
  ASSERT_TRUE(imdb.has_value());
  EXPECT_EQ(imdb->files.size(), 2u);
  fs::create_directories(root / "aps/super_glue/boolq/validation");
  std::ofstream(root / "aps/super_glue/boolq/validation/0000.parquet") << "x";
  auto boolq = data::locate(*catalog.find("super_glue/boolq"), {root}, false);
  ASSERT_TRUE(boolq.has_value());
  EXPECT_EQ(boolq->files.size(), 1u);
  fs::remove_all(root);
}

TEST(Plan, MixIsSplitmix64) { EXPECT_EQ(mix64(0), 0xe220a8397b1dcdafull); }

}  // namespace
}  // namespace moetrace
