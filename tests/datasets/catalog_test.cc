#include "data/catalog.h"

#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <set>

#include "core/error.h"

namespace moetrace::data {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

const Catalog& builtin() {
  static const Catalog c = Catalog::builtin();
  return c;
}

TEST(Catalog, BuiltinListsTheSeedsMaximumCollection) {
  const auto& ds = builtin().datasets();
  EXPECT_EQ(ds.size(), 62u);
  std::set<std::string> names, prefixes;
  for (const auto& d : ds) {
    names.insert(d.name);
    prefixes.insert(d.id_prefix());
    EXPECT_FALSE(d.hub.empty()) << d.name;
    EXPECT_FALSE(d.prompt.empty()) << d.name;
    EXPECT_FALSE(d.fields.empty()) << d.name;
  }
  EXPECT_EQ(names.size(), ds.size());
  EXPECT_EQ(prefixes.size(), ds.size());
  for (const char* n :
       {"cnn_dailymail", "imdb", "wikitext", "squad", "billsum", "glue/qqp", "glue/mnli",
        "super_glue/wic", "super_glue/record", "ms_marco", "conv_ai_2", "tweet_eval/emotion",
        "ethos", "amazon_us_reviews", "great_code", "tydiqa"}) {
    EXPECT_NE(builtin().find(n), nullptr) << n;
  }
}

TEST(Catalog, QuotasFollowTheSeed) {
  for (const auto& d : builtin().datasets()) {
    int64_t want = 100;
    if (d.category == "core") want = 200;
    if (d.category == "glue" || d.category == "classification") want = 150;
    EXPECT_EQ(d.quota, want) << d.name;
  }
}

TEST(Catalog, CorePromptsAreTheGuides) {
  EXPECT_EQ(builtin().find("cnn_dailymail")->prompt, "summarize: {article}");
  EXPECT_EQ(builtin().find("imdb")->prompt, "analyze sentiment: {text}");
  EXPECT_EQ(builtin().find("wikitext")->prompt, "summarize: {text}");
  EXPECT_EQ(builtin().find("squad")->prompt, "answer: {question} {context}");
  EXPECT_EQ(builtin().find("glue/mrpc")->prompt,
            "mrpc sentence1: {sentence1} sentence2: {sentence2}");
  EXPECT_EQ(builtin().find("glue/mnli")->split, "validation_matched");
}

// Pairs and multi-field examples: every text field of the dataset is in the template.
TEST(Catalog, PairTasksUseEveryField) {
  const std::map<std::string, std::vector<std::string>> want = {
      {"glue/mrpc", {"sentence1", "sentence2"}},
      {"glue/qqp", {"question1", "question2"}},
      {"glue/mnli", {"hypothesis", "premise"}},
      {"glue/qnli", {"question", "sentence"}},
      {"glue/rte", {"sentence1", "sentence2"}},
      {"glue/wnli", {"sentence1", "sentence2"}},
      {"glue/stsb", {"sentence1", "sentence2"}},
      {"super_glue/cb", {"hypothesis", "premise"}},
      {"super_glue/wic", {"sentence1", "sentence2", "word"}},
      {"super_glue/copa", {"choice1", "choice2", "premise", "question"}},
      {"super_glue/boolq", {"passage", "question"}},
      {"super_glue/multirc", {"question", "answer", "paragraph"}},
      {"squad", {"question", "context"}},
      {"paws", {"sentence1", "sentence2"}}};
  for (const auto& [name, fields] : want) {
    const auto* d = builtin().find(name);
    ASSERT_NE(d, nullptr) << name;
    auto used = template_fields(d->prompt);
    for (const auto& f : fields) {
      EXPECT_NE(std::find(used.begin(), used.end(), f), used.end()) << name << " lacks " << f;
    }
  }
}

TEST(Catalog, Selection) {
  EXPECT_EQ(builtin().select("core").size(), 5u);
  EXPECT_EQ(builtin().select("maximum").size(), 62u);
  EXPECT_EQ(builtin().select("glue").size(), 9u);
  EXPECT_EQ(builtin().select("superglue").size(), 8u);
  EXPECT_EQ(builtin().select("demo").size(), 10u);
  auto two = builtin().select("imdb, glue/mrpc,imdb");
  ASSERT_EQ(two.size(), 2u);
  EXPECT_EQ(two[0]->name, "imdb");
  EXPECT_THROW(builtin().select("no_such_dataset"), Error);
}

TEST(Catalog, RenderFillsFieldsFromAliasesPathsAndLists) {
  const auto* mrpc = builtin().find("glue/mrpc");
  auto hub =
      render_prompt(*mrpc, mrpc->prompt, json{{"sentence1", "A b."}, {"sentence2", " C d. "}});
  EXPECT_EQ(hub.text, "mrpc sentence1: A b. sentence2: C d.");
  auto original = render_prompt(*mrpc, mrpc->prompt, json{{"#1 String", "A"}, {"#2 String", "B"}});
  EXPECT_EQ(original.text, "mrpc sentence1: A sentence2: B");
  EXPECT_EQ(original.content_chars, 2u);
  auto missing = render_prompt(*mrpc, mrpc->prompt, json{{"sentence1", "A"}});
  EXPECT_EQ(missing.missing_field, "sentence2");

  const auto* marco = builtin().find("ms_marco");
  auto m =
      render_prompt(*marco, marco->prompt,
                    json{{"query", "q?"},
                         {"passages", {{"is_selected", {0, 1}}, {"passage_text", {"p1", "p2"}}}}});
  EXPECT_EQ(m.text, "answer: q? context: p1 p2");

  const auto* convai = builtin().find("conv_ai_2");
  auto c = render_prompt(*convai, convai->prompt,
                         json{{"dialog", json::array({{{"sender", 0}, {"text", "hi"}},
                                                      {{"sender", 1}, {"text", "yo"}}})}});
  EXPECT_EQ(c.text, "dialogue: hi yo");

  const auto* ag = builtin().find("ag_news");
  auto a =
      render_prompt(*ag, ag->prompt, json{{"label", "3"}, {"title", "T"}, {"description", "D"}});
  EXPECT_EQ(a.text, "classify topic: T D");

  const auto* yahoo = builtin().find("yahoo_answers_topics");
  auto y =
      render_prompt(*yahoo, yahoo->prompt, json{{"question_title", "Q"}, {"best_answer", "A"}});
  EXPECT_TRUE(y.missing_field.empty());  // {question_content?} is optional
}

TEST(Catalog, TemplateParsing) {
  EXPECT_EQ(template_fields("a {x} {y?} {{literal}}"), (std::vector<std::string>{"x", "y"}));
  EXPECT_THROW(template_fields("broken {x"), Error);
  DatasetSpec d;
  d.fields = {{"x", {"x"}}};
  EXPECT_EQ(render_prompt(d, "{{x}} {x}", json{{"x", 5}}).text, "{x} 5");
}

TEST(Catalog, UserSpecFileAddsAndReplaces) {
  const fs::path p = fs::temp_directory_path() / "mt_user_catalog.json";
  std::ofstream(p) << R"({"version": 1, "datasets": [
    {"name": "my/reviews", "hub": "me/reviews", "split": "train", "category": "mine", "quota": 7,
     "template": "review: {body}", "fields": {"body": ["review_body", "text"]}},
    {"name": "imdb", "hub": "stanfordnlp/imdb", "config": "plain_text", "split": "test",
     "category": "core", "quota": 5, "template": "sentiment: {text}"}]})";
  Catalog c = Catalog::builtin();
  c.merge(Catalog::load(p));
  EXPECT_EQ(c.datasets().size(), 63u);
  EXPECT_EQ(c.find("imdb")->quota, 5);
  EXPECT_EQ(c.select("mine").size(), 1u);
  EXPECT_EQ(c.find("my/reviews")->id_prefix(), "reviews/default/train");
  fs::remove(p);
}

TEST(Catalog, InvalidSpecFilesNameTheProblem) {
  auto expect_error = [](const std::string& text, const std::string& needle) {
    try {
      Catalog::from_json(json::parse(text), "spec.json");
      ADD_FAILURE() << "no error for " << text;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  expect_error(R"({"datasets": [{"name": "a"}]})", "missing \"hub\"");
  expect_error(
      R"({"datasets": [{"name": "a", "hub": "o/a", "split": "s", "category": "c", "template": "{x",
                  "quota": 1}]})",
      "unclosed");
  expect_error(
      R"({"datasets": [{"name": "a", "hub": "o/a", "split": "s", "category": "c", "template": "{x}",
                  "quota": 0}]})",
      "quota");
  expect_error(R"({"datasets": [
      {"name": "a", "hub": "o/a", "split": "s", "category": "c", "template": "{x}"},
      {"name": "b", "hub": "o/a", "split": "s", "category": "c", "template": "{x}"}]})",
               "collide");
  expect_error(R"({"version": 2, "datasets": []})", "version");
  EXPECT_THROW(Catalog::load("/nonexistent/catalog.json"), Error);
}

}  // namespace
}  // namespace moetrace::data
