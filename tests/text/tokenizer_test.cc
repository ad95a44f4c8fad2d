#include "text/tokenizer.h"

#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "core/error.h"

namespace moetrace {
namespace {

namespace fs = std::filesystem;
const fs::path kData = MOETRACE_TEST_DATA;
const fs::path kModel = kData / "t5-spiece/spiece.model";

const T5Tokenizer& tokenizer() {
  static const T5Tokenizer tok = T5Tokenizer::load(kModel);
  return tok;
}

// Acceptance: the ids transformers' T5Tokenizer gives for all 260 reference texts.
TEST(T5Tokenizer, MatchesTransformersOnReferenceTexts) {
  std::ifstream in(kData / "t5-spiece/t5_tokenizer_reference.jsonl");
  ASSERT_TRUE(in);
  std::string line;
  int n = 0, mismatches = 0;
  while (std::getline(in, line)) {
    auto row = nlohmann::json::parse(line);
    const std::string text = row.at("text").get<std::string>();
    const auto expected = row.at("auto").get<std::vector<int32_t>>();
    const auto got = tokenizer().encode(text);
    if (got != expected) {
      ++mismatches;
      ADD_FAILURE() << "text #" << n << ": " << text.substr(0, 80);
    }
    ++n;
  }
  EXPECT_EQ(n, 260);
  EXPECT_EQ(mismatches, 0);
}

TEST(T5Tokenizer, KnownIds) {
  EXPECT_EQ(tokenizer().encode("Hello world"), (std::vector<int32_t>{8774, 296, 1}));
  EXPECT_EQ(tokenizer().encode(""), (std::vector<int32_t>{1}));
  EXPECT_EQ(tokenizer().vocab_size(), 32100);
}

TEST(T5Tokenizer, SpecialTokensWrittenLiterally) {
  EXPECT_EQ(tokenizer().encode("<extra_id_0>"), (std::vector<int32_t>{32099, 1}));
  EXPECT_EQ(tokenizer().encode("<extra_id_99><pad><unk></s>"),
            (std::vector<int32_t>{32000, 0, 2, 1, 1}));
  // Not special: out of range, leading zero, unterminated.
  for (const char* s : {"<extra_id_100>", "<extra_id_07>", "<extra_id_3", "<s>"}) {
    auto ids = tokenizer().encode(s);
    for (size_t i = 0; i + 1 < ids.size(); ++i) EXPECT_LT(ids[i], 32000) << s;
  }
}

TEST(T5Tokenizer, TruncationKeepsFinalEos) {
  auto full = tokenizer().encode("translate English to German: The house is wonderful.");
  ASSERT_EQ(full, (std::vector<int32_t>{13959, 1566, 12, 2968, 10, 37, 629, 19, 1627, 5, 1}));
  auto cut = tokenizer().encode("translate English to German: The house is wonderful.", 4);
  EXPECT_EQ(cut, (std::vector<int32_t>{13959, 1566, 12, 1}));
  EXPECT_EQ(tokenizer().encode("Hello world", 1), (std::vector<int32_t>{1}));
  EXPECT_EQ(tokenizer().encode("Hello world", 100), tokenizer().encode("Hello world"));
}

TEST(T5Tokenizer, DecodeRoundTrip) {
  EXPECT_EQ(tokenizer().decode(tokenizer().encode("Hello world")), "Hello world");
  EXPECT_EQ(tokenizer().decode({32099, 8774, 1}), "<extra_id_0> Hello");
}

TEST(T5Tokenizer, Sha256OfModelFile) {
  EXPECT_EQ(tokenizer().sha256(),
            "d60acb128cf7b7f2536e8f38a5b18a05535c9e14c7a355904270e15b0945ea86");
}

TEST(T5Tokenizer, LoadErrorsNameTheFile) {
  try {
    T5Tokenizer::load("/nonexistent/spiece.model");
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("/nonexistent/spiece.model"), std::string::npos);
  }
  const fs::path bad = fs::temp_directory_path() / "mt_bad_spiece.model";
  std::ofstream(bad) << "not a model";
  EXPECT_THROW(T5Tokenizer::load(bad), Error);
  fs::remove(bad);
}

}  // namespace
}  // namespace moetrace
