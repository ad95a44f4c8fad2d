// --datasets beyond catalog names: the default selection, --split, a user's files and folders, the
// publishers' own archive layouts, and catalog values that would leave the data roots.
#include "data/selection.h"

#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <regex>

#include "core/error.h"
#include "data/locate.h"
#include "data/plan.h"

namespace moetrace {
namespace {

namespace fs = std::filesystem;
using data::Catalog;
using data::DatasetSpec;
const fs::path kData = MOETRACE_TEST_DATA;

// A fresh empty folder under the temp dir.
fs::path fresh_dir(const std::string& name) {
  fs::path d = fs::temp_directory_path() / ("mt_selection_" + name);
  fs::remove_all(d);
  fs::create_directories(d);
  return d;
}

void write(const fs::path& p, const std::string& bytes) {
  fs::create_directories(p.parent_path());
  std::ofstream(p, std::ios::binary) << bytes;
}

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "(no error)";
}

std::map<std::string, std::vector<const PlannedSample*>> by_dataset(
    const std::vector<PlannedSample>& plan) {
  std::map<std::string, std::vector<const PlannedSample*>> out;
  for (const auto& s : plan) out[s.dataset].push_back(&s);
  return out;
}

// ---- catalog values never lead outside the data roots (hardening issue, item 11) ----

TEST(CatalogPaths, RefusesParentAndAbsolutePaths) {
  auto entry = [](const std::string& key, const nlohmann::json& value) {
    nlohmann::json e = {{"name", "x"},
                        {"hub", "org/x"},
                        {"split", "validation"},
                        {"category", "c"},
                        {"template", "{text}"}};
    e[key] = value;
    return nlohmann::json{{"datasets", {e}}};
  };
  for (const auto& [key, value] : std::vector<std::pair<std::string, nlohmann::json>>{
           {"hub", "../../etc"},
           {"hub", "/etc/x"},
           {"hub", "org/../../x"},
           {"hub", "a/b/c"},
           {"hub", ".."},
           {"config", "../secret"},
           {"config", "/abs"},
           {"config", ".."},
           {"split", "../../x"},
           {"files", nlohmann::json::array({"../x.txt"})},
           {"files", nlohmann::json::array({"/etc/passwd.txt"})},
           {"files", nlohmann::json::array({"a/../../b.txt"})}}) {
    const std::string err =
        error_of([&, &k = key, &v = value] { Catalog::from_json(entry(k, v), "spec.json"); });
    EXPECT_NE(err.find("spec.json: datasets[0] (x): \"" + key + "\""), std::string::npos)
        << key << "=" << value.dump() << ": " << err;
    EXPECT_NE(err.find("below a data root"), std::string::npos) << err;
  }
  // What the built-in catalog uses stays accepted.
  EXPECT_NO_THROW(Catalog::from_json(entry("config", "wsc.fixed"), "spec.json"));
  EXPECT_NO_THROW(
      Catalog::from_json(entry("files", nlohmann::json::array({"WSC/val.jsonl"})), "spec.json"));
  EXPECT_NO_THROW(Catalog::builtin());
}

TEST(CatalogPaths, AFileBesideTheDataRootIsNeverRead) {
  const fs::path base = fresh_dir("escape");
  write(base / "outside/validation.jsonl", "{\"text\": \"a secret beside the data root\"}\n");
  fs::create_directories(base / "root");
  write(base / "spec.json",
        R"({"datasets": [{"name": "escape", "hub": "../outside", "split": "validation",
                          "category": "c", "template": "{text}"}]})");
  PlanOptions o;
  o.datasets = "escape";
  o.data_roots = {base / "root"};
  o.extra_catalog = base / "spec.json";
  o.search_hf_cache = false;
  const std::string err = error_of([&] { build_plan(o, nullptr); });
  EXPECT_NE(err.find("\"hub\" \"../outside\""), std::string::npos) << err;
}

// ---- --split ----

data::SelectOptions split_of(const std::string& split) {
  data::SelectOptions so;
  so.split = split;
  return so;
}

TEST(Split, OverridesTheCatalogsSplit) {
  const Catalog c = Catalog::builtin();
  EXPECT_EQ(c.find("glue/mrpc")->with_split("train").split, "train");
  EXPECT_EQ(c.find("glue/mrpc")->with_split("catalog").split, "validation");
  EXPECT_EQ(c.find("glue/mrpc")->with_split("train").id_prefix(), "glue/mrpc/train");
  // MNLI's validation is validation_matched: kept; its test split is named as asked.
  EXPECT_EQ(c.find("glue/mnli")->with_split("validation").split, "validation_matched");
  EXPECT_EQ(c.find("glue/mnli")->with_split("test").split, "test");
  // The publisher's files name the catalog split only.
  EXPECT_FALSE(c.find("financial_phrasebank")->with_split("train").files.empty());
  EXPECT_TRUE(c.find("financial_phrasebank")->with_split("test").files.empty());
  for (const auto& d : data::resolve_selection(c, "glue", split_of("test")))
    EXPECT_EQ(d.split, "test");
  EXPECT_NE(error_of([&] {
              data::resolve_selection(c, "glue", split_of("dev"));
            }).find("--split 'dev': expected train, validation, test or catalog"),
            std::string::npos);
}

TEST(Split, ReadsTheOverriddenSplitsFiles) {
  const fs::path root = fresh_dir("split");
  write(root / "fancyzhx/ag_news/data/train.csv", "3,Train title,train text\n");
  write(root / "fancyzhx/ag_news/data/test.csv", "3,Test title,test text\n");
  PlanOptions o;
  o.datasets = "ag_news";
  o.data_roots = {root};
  o.search_hf_cache = false;
  o.split = "train";
  auto plan = build_plan(o, nullptr);
  ASSERT_EQ(plan.size(), 1u);
  EXPECT_EQ(plan[0].sample_id, "ag_news/default/train/0");
  EXPECT_NE(plan[0].text.find("Train title"), std::string::npos);
  o.split = "catalog";
  plan = build_plan(o, nullptr);
  ASSERT_EQ(plan.size(), 1u);
  EXPECT_EQ(plan[0].sample_id, "ag_news/default/test/0");
}

// ---- the default selection (issue 13) ----

TEST(DefaultSelection, EveryCatalogDatasetPresent) {
  PlanOptions o;  // datasets "": the default
  o.data_roots = {data::demo_data_root()};
  o.search_hf_cache = false;
  PlanStats stats;
  auto plan = build_plan(o, &stats);
  EXPECT_FALSE(stats.bundled);
  EXPECT_TRUE(stats.missing.empty());  // absent catalog datasets are not "missing" here
  EXPECT_EQ(by_dataset(plan).size(), 10u);
  // The recorded selection reproduces the plan.
  EXPECT_EQ(stats.selection,
            "wikitext,glue/sst2,glue/mrpc,glue/qnli,glue/rte,glue/stsb,super_glue/cb,"
            "super_glue/rte,ag_news,tweet_eval/emotion");
  PlanOptions again = o;
  again.datasets = stats.selection;
  auto plan2 = build_plan(again, nullptr);
  ASSERT_EQ(plan2.size(), plan.size());
  for (size_t i = 0; i < plan.size(); ++i) EXPECT_EQ(plan[i].sample_id, plan2[i].sample_id);
}

TEST(DefaultSelection, NothingPresentUsesTheBundledRows) {
  PlanOptions o;
  o.data_roots = {fresh_dir("empty_root")};
  o.search_hf_cache = false;
  PlanStats stats;
  auto plan = build_plan(o, &stats);
  EXPECT_TRUE(stats.bundled);
  EXPECT_EQ(stats.selection, "demo");
  EXPECT_GE(plan.size(), 1000u);
  EXPECT_EQ(by_dataset(plan).size(), 10u);

  o.bundled_fallback = false;
  EXPECT_NE(error_of([&] {
              build_plan(o, nullptr);
            }).find("fetch them with `moetrace fetch --datasets maximum`"),
            std::string::npos);
  // An explicit selection that finds nothing names its own fetch command.
  o.datasets = "core";
  EXPECT_NE(error_of([&] {
              build_plan(o, nullptr);
            }).find("fetch them with `moetrace fetch --datasets core`"),
            std::string::npos);
}

// ---- a user's files and folders (papercuts issue, item 8) ----

TEST(FileSelection, FilesAndFoldersMixWithCatalogNames) {
  const fs::path dir = fresh_dir("files");
  write(dir / "my.jsonl",
        "{\"text\": \"first line of mine\", \"n\": 1}\n{\"text\": \"second line of mine\"}\n");
  write(dir / "notes.csv", "id,body\n1,\"a note, with a comma\"\n2,another note\n");
  write(dir / "plain.tsv", "x\tfirst column\nx\tsecond column\n");
  write(dir / "my folder/a.txt", "alpha\nbeta\n");
  write(dir / "my folder/sub/b.txt.gz.not", "ignored\n");
  write(dir / "my folder/sub/c.txt", "gamma\n");
  PlanOptions o;
  o.datasets = "glue/mrpc," + (dir / "my.jsonl").string() + "," + (dir / "notes.csv").string() +
               ":body," + (dir / "plain.tsv").string() + ":1," + (dir / "my folder").string();
  o.data_roots = {data::demo_data_root()};
  o.search_hf_cache = false;
  o.max_samples = 1000;
  PlanStats stats;
  auto plan = build_plan(o, &stats);
  auto g = by_dataset(plan);
  ASSERT_EQ(g.size(), 5u);
  EXPECT_EQ(g["glue/mrpc"].size(), 150u);
  ASSERT_EQ(g["my"].size(), 2u);
  ASSERT_EQ(g["notes"].size(), 2u);
  ASSERT_EQ(g["plain"].size(), 2u);
  ASSERT_EQ(g["my_folder"].size(), 3u);
  std::map<std::string, std::string> text;
  const std::regex id_re(R"([A-Za-z0-9._-]+/[^/]+/[^/]+/\d+)");
  for (const auto& s : plan) {
    EXPECT_TRUE(std::regex_match(s.sample_id, id_re)) << s.sample_id;
    text[s.sample_id] = s.text;
  }
  EXPECT_EQ(text["my/default/file/0"], "first line of mine");
  EXPECT_EQ(text["my/default/file/1"], "second line of mine");
  EXPECT_EQ(text["notes/default/file/0"], "a note, with a comma");
  EXPECT_EQ(text["plain/default/file/1"], "second column");  // headerless: column 1
  EXPECT_EQ(text["my_folder/default/file/0"], "alpha");      // a.txt, then sub/c.txt
  EXPECT_EQ(text["my_folder/default/file/2"], "gamma");
}

TEST(FileSelection, ErrorsNameTheFileAndWhatWasExpected) {
  const fs::path dir = fresh_dir("file_errors");
  write(dir / "rows.jsonl", "{\"body\": \"x\", \"title\": \"y\"}\n");
  write(dir / "a/rows.jsonl", "{\"text\": \"x\"}\n");
  write(dir / "data.xml", "<x/>");
  fs::create_directories(dir / "empty");
  const Catalog c = Catalog::builtin();
  auto err = [&](const std::string& sel) {
    return error_of([&] { data::resolve_selection(c, sel); });
  };
  EXPECT_NE(err((dir / "nope.jsonl").string()).find("nope.jsonl: no such file or folder"),
            std::string::npos);
  EXPECT_NE(err("nosuchdataset").find("unknown dataset or group \"nosuchdataset\""),
            std::string::npos);
  EXPECT_NE(err((dir / "data.xml").string()).find("data.xml: unknown data format"),
            std::string::npos);
  EXPECT_NE(err((dir / "empty").string()).find("empty: no data files"), std::string::npos);
  EXPECT_NE(err((dir / "rows.jsonl").string() + ":").find("no column name after ':'"),
            std::string::npos);
  EXPECT_NE(err((dir / "rows.jsonl").string() + "," + (dir / "a/rows.jsonl").string())
                .find("two datasets are named \"rows\""),
            std::string::npos);

  PlanOptions o;
  o.datasets = (dir / "rows.jsonl").string();
  o.search_hf_cache = false;
  EXPECT_NE(error_of([&] { build_plan(o, nullptr); })
                .find("rows.jsonl: no row has the column \"text\" (the first has: body, title); "
                      "name one as " +
                      (dir / "rows.jsonl").string() + ":COLUMN"),
            std::string::npos);
  o.datasets += ":title";
  auto plan = build_plan(o, nullptr);
  ASSERT_EQ(plan.size(), 1u);
  EXPECT_EQ(plan[0].text, "y");
}

// ---- the publishers' own archives under a data root (papercuts issue, item 15) ----

TEST(PublisherArchives, GlueSuperGlueAndFinancialPhraseBank) {
  PlanOptions o;
  o.datasets = "glue/cola,glue/mrpc,super_glue/wsc,financial_phrasebank";
  o.data_roots = {kData / "publisher_archives"};
  o.search_hf_cache = false;
  PlanStats stats;
  auto plan = build_plan(o, &stats);
  for (const auto& d : stats.datasets) {
    EXPECT_EQ(d.status, "planned") << d.dataset << " " << d.error;
    EXPECT_EQ(d.eligible, d.rows) << d.dataset;
    EXPECT_TRUE(d.skipped.empty()) << d.dataset;
  }
  std::map<std::string, std::string> text;
  for (const auto& s : plan) text[s.sample_id] = s.text;
  auto g = by_dataset(plan);
  EXPECT_EQ(g["glue/cola"].size(), 10u);  // no header row taken for data or lost
  EXPECT_EQ(text["glue/cola/validation/1"],
            "cola sentence: The committee approved before the meeting ended the budget.");
  EXPECT_EQ(g["glue/mrpc"].size(), 5u);
  EXPECT_EQ(text["glue/mrpc/validation/1"],
            "mrpc sentence1: The storm knocked out power to about 40,000 homes on Tuesday night. "
            "sentence2: Officials said repairs to the damaged lines could take until the end of "
            "the week.");
  EXPECT_EQ(g["super_glue/wsc"].size(), 6u);
  EXPECT_EQ(text["super_glue/wsc.fixed/validation/0"],
            "wsc text: The trophy would not fit in the brown suitcase because it was too big. "
            "span1: The trophy span2: it");
  EXPECT_EQ(g["financial_phrasebank"].size(), 6u);
  EXPECT_EQ(text["financial_phrasebank/sentences_allagree/train/2"],
            "analyze sentiment: The new production line will be located in Jyv\xC3\xA4skyl\xC3\xA4 "
            ", central Finland .");
  EXPECT_EQ(text["financial_phrasebank/sentences_allagree/train/4"],
            "analyze sentiment: The agreement was signed in Espoo @ the company 's head office .");
}

TEST(PublisherArchives, UpperCaseTaskFoldersAndPublishersFileNames) {
  const fs::path root = fresh_dir("glue_folders");
  write(root / "glue/QNLI/dev.tsv",
        "index\tquestion\tsentence\tlabel\n0\tWho?\tHe did.\tentailment\n");
  write(root / "glue/SST-2/dev.tsv", "sentence\tlabel\na fine film \t1\n");
  write(
      root / "glue/MNLI/dev_matched.tsv",
      "index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\t"
      "sentence1_parse\tsentence2_parse\tsentence1\tsentence2\tlabel1\tgold_label\n"
      "0\t1\t1n\tfiction\t(a)\t(b)\t(A)\t(B)\tThe cat sat.\tA cat sat.\tentailment\tentailment\n");
  write(root / "super_glue/BoolQ/val.jsonl",
        "{\"question\": \"is it\", \"passage\": \"It is.\", \"idx\": 0, \"label\": true}\n");
  PlanOptions o;
  o.datasets = "glue/qnli,glue/sst2,glue/mnli,super_glue/boolq";
  o.data_roots = {root};
  o.search_hf_cache = false;
  PlanStats stats;
  auto plan = build_plan(o, &stats);
  EXPECT_TRUE(stats.missing.empty());
  std::map<std::string, std::string> text;
  for (const auto& s : plan) text[s.dataset] = s.text;
  EXPECT_EQ(text["glue/qnli"], "qnli question: Who? sentence: He did.");
  EXPECT_EQ(text["glue/sst2"], "sst2 sentence: a fine film");
  EXPECT_EQ(text["glue/mnli"], "mnli hypothesis: A cat sat. premise: The cat sat.");
  EXPECT_NE(text["super_glue/boolq"].find("It is."), std::string::npos);
  // --split other than the catalog's does not read the publisher's dev files.
  o.datasets = "glue/sst2";
  o.split = "train";
  EXPECT_NE(error_of([&] { build_plan(o, nullptr); }).find("none of the 1 selected datasets"),
            std::string::npos);
}

}  // namespace
}  // namespace moetrace
