// The LM tokenizers against Hugging Face's ids for the fixtures of tests/data/tokenizers_lm (made
// by scripts/make_tokenizer_fixtures.py with `tokenizers` / transformers).
#include <gtest/gtest.h>
#include <unistd.h>

#include <atomic>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <thread>

#include "core/error.h"
#include "text/hf_tokenizer.h"
#include "text/text_tokenizer.h"
#include "text/text_util.h"
#include "text/tokenizer.h"

namespace moetrace {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;
const fs::path kData = fs::path(MOETRACE_TEST_DATA) / "tokenizers_lm";

struct Row {
  std::string text;
  std::vector<int32_t> ids;
  std::string decoded;
};

std::vector<Row> reference(const std::string& folder) {
  std::ifstream in(kData / folder / "reference.jsonl");
  EXPECT_TRUE(in) << folder;
  std::vector<Row> rows;
  std::string line;
  while (std::getline(in, line)) {
    auto j = json::parse(line);
    rows.push_back({j.at("text").get<std::string>(), j.at("ids").get<std::vector<int32_t>>(),
                    j.at("decoded").get<std::string>()});
  }
  return rows;
}

std::string show(const std::vector<int32_t>& ids) {
  std::string s;
  for (int32_t id : ids) s += std::to_string(id) + " ";
  return s;
}

class Reference : public testing::TestWithParam<std::string> {};

// Acceptance: ids identical to Hugging Face's on every reference text, and decode as it decodes.
TEST_P(Reference, IdsAndDecodeMatchHuggingFace) {
  auto tok = load_text_tokenizer(kData / GetParam());
  auto rows = reference(GetParam());
  ASSERT_GE(rows.size(), GetParam() == "tiny_bpe" ? 14u : 450u);
  int id_mismatches = 0, decode_mismatches = 0;
  for (size_t i = 0; i < rows.size(); ++i) {
    auto got = tok->encode(rows[i].text);
    if (got != rows[i].ids && ++id_mismatches <= 5) {
      ADD_FAILURE() << GetParam() << " text #" << i << " " << json(rows[i].text).dump()
                    << "\n  expected " << show(rows[i].ids) << "\n  got      " << show(got);
    }
    std::string text = tok->decode(rows[i].ids);
    if (text != rows[i].decoded && ++decode_mismatches <= 5) {
      ADD_FAILURE() << GetParam() << " decode #" << i << " expected "
                    << json(rows[i].decoded).dump() << " got " << json(text).dump();
    }
  }
  EXPECT_EQ(id_mismatches, 0);
  EXPECT_EQ(decode_mismatches, 0);
}

INSTANTIATE_TEST_SUITE_P(TokenizersLm, Reference,
                         testing::Values("qwen2_bpe", "olmoe_bpe", "template_bpe", "fallback_bpe",
                                         "llama_spm", "llama_spm_nolegacy", "tiny_bpe"));

// The fixtures exercise what they claim to: without these the parity test would prove less.
TEST(TokenizersLm, FixturesCoverTheFeatures) {
  auto has = [](const std::string& folder, auto pred) {
    for (const Row& r : reference(folder)) {
      if (pred(r)) return true;
    }
    return false;
  };
  // byte fallback: <0xXX> ids (1..256 in fallback_bpe, 3..258 in llama_spm)
  EXPECT_TRUE(has("fallback_bpe", [](const Row& r) {
    return std::any_of(r.ids.begin(), r.ids.end(), [](int32_t i) { return i >= 1 && i <= 256; });
  }));
  EXPECT_TRUE(has("llama_spm", [](const Row& r) {
    return std::any_of(r.ids.begin(), r.ids.end(), [](int32_t i) { return i >= 3 && i <= 258; });
  }));
  // special tokens written in the text, NFC changing the text, the empty string
  EXPECT_TRUE(has("qwen2_bpe", [](const Row& r) {
    return std::count(r.ids.begin(), r.ids.end(), 1501) > 0;  // <|im_start|>
  }));
  EXPECT_TRUE(has("qwen2_bpe", [](const Row& r) { return r.decoded != r.text; }));
  EXPECT_TRUE(has("qwen2_bpe", [](const Row& r) { return r.text.empty(); }));
}

TEST(TokenizersLm, FactoryPicksByFile) {
  EXPECT_EQ(load_text_tokenizer(kData / "qwen2_bpe")->kind(), "hf-bpe");
  EXPECT_EQ(load_text_tokenizer(kData / "llama_spm")->kind(), "llama-spm");
  auto t5 = load_text_tokenizer(fs::path(MOETRACE_TEST_DATA) / "t5-spiece");
  EXPECT_EQ(t5->kind(), "t5-spiece");
  // The T5 path is T5Tokenizer itself.
  auto direct = T5Tokenizer::load(fs::path(MOETRACE_TEST_DATA) / "t5-spiece/spiece.model");
  EXPECT_EQ(t5->encode("Hello <extra_id_0> world", 0), direct.encode("Hello <extra_id_0> world"));
  EXPECT_EQ(t5->encode("a b c d e f g", 3), direct.encode("a b c d e f g", 3));
  EXPECT_EQ(t5->sha256(), direct.sha256());
  EXPECT_EQ(t5->vocab_size(), 32100);
  EXPECT_EQ(t5->eos_id(), 1);
  EXPECT_EQ(t5->pad_id(), 0);
  EXPECT_EQ(t5->bos_id(), -1);
  // A file by its name.
  EXPECT_EQ(load_text_tokenizer_file(kData / "olmoe_bpe/tokenizer.json")->kind(), "hf-bpe");
  EXPECT_EQ(load_text_tokenizer_file(kData / "llama_spm/tokenizer.model")->kind(), "llama-spm");
}

TEST(TokenizersLm, SpecialIdsFromTokenizerConfig) {
  auto qwen = load_text_tokenizer(kData / "qwen2_bpe");
  EXPECT_EQ(qwen->bos_id(), -1);
  EXPECT_EQ(qwen->eos_id(), 1500);  // <|endoftext|>
  EXPECT_EQ(qwen->pad_id(), 1500);
  EXPECT_EQ(qwen->vocab_size(), 1505);  // 1500 + 5 added tokens
  auto olmoe = load_text_tokenizer(kData / "olmoe_bpe");
  EXPECT_EQ(olmoe->eos_id(), 1200);
  EXPECT_EQ(olmoe->pad_id(), 1201);  // <|padding|>
  auto llama = load_text_tokenizer(kData / "llama_spm");
  EXPECT_EQ(llama->bos_id(), 1);
  EXPECT_EQ(llama->eos_id(), 2);
  EXPECT_EQ(llama->pad_id(), -1);
  EXPECT_EQ(llama->vocab_size(), 1200);
  // OLMoE and Qwen add no BOS/EOS by default; Llama prepends <s> only.
  EXPECT_EQ(qwen->encode("hi").size(), qwen->encode("hi").size());
  EXPECT_NE(qwen->encode("hi").front(), 1500);
  EXPECT_EQ(llama->encode("hi").front(), 1);
  EXPECT_NE(llama->encode("hi").back(), 2);
  EXPECT_EQ(llama->encode(""), (std::vector<int32_t>{1}));
}

TEST(TokenizersLm, FilesAndSha256) {
  auto tok = load_text_tokenizer(kData / "qwen2_bpe");
  auto files = tok->files();
  ASSERT_EQ(files.size(), 2u);
  EXPECT_EQ(files[0].name, "tokenizer.json");
  EXPECT_EQ(files[1].name, "tokenizer_config.json");
  EXPECT_EQ(tok->sha256(), files[0].sha256);
  EXPECT_EQ(files[0].sha256,
            text::hex_sha256(text::read_file_bytes(kData / "qwen2_bpe/tokenizer.json", "")));
  EXPECT_EQ(text::hex_sha256("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  auto llama = load_text_tokenizer(kData / "llama_spm");
  EXPECT_EQ(llama->files()[0].name, "tokenizer.model");
  EXPECT_EQ(llama->sha256(),
            text::hex_sha256(text::read_file_bytes(kData / "llama_spm/tokenizer.model", "")));
}

// Truncation as transformers truncates: the template's tokens kept, the text's ids cut.
TEST(TokenizersLm, TruncationKeepsTemplateTokens) {
  auto tok = load_text_tokenizer(kData / "template_bpe");
  std::ifstream in(kData / "template_bpe/truncated.jsonl");
  ASSERT_TRUE(in);
  std::string line;
  int n = 0;
  while (std::getline(in, line)) {
    auto j = json::parse(line);
    EXPECT_EQ(tok->encode(j.at("text").get<std::string>(), j.at("max_length").get<int>()),
              j.at("ids").get<std::vector<int32_t>>())
        << j.at("text").dump();
    ++n;
  }
  EXPECT_EQ(n, 80);
  auto llama = load_text_tokenizer(kData / "llama_spm");
  auto full = llama->encode("The quick brown fox jumps over the lazy dog");
  auto cut = llama->encode("The quick brown fox jumps over the lazy dog", 4);
  ASSERT_GT(full.size(), 4u);
  EXPECT_EQ(cut, std::vector<int32_t>(full.begin(), full.begin() + 4));
}

// encode is const and thread-safe: several threads over the same tokenizer (and its word
// cache) give the same ids as the reference.
TEST(TokenizersLm, EncodeFromSeveralThreads) {
  for (const char* folder : {"qwen2_bpe", "llama_spm"}) {
    auto tok = load_text_tokenizer(kData / folder);
    auto rows = reference(folder);
    std::atomic<int> mismatches{0};
    std::vector<std::thread> threads;
    for (int t = 0; t < 4; ++t) {
      threads.emplace_back([&, t] {
        for (int rep = 0; rep < 3; ++rep) {
          for (size_t i = static_cast<size_t>(t); i < rows.size(); i += 2) {
            if (tok->encode(rows[i].text) != rows[i].ids) ++mismatches;
          }
        }
      });
    }
    for (auto& th : threads) th.join();
    EXPECT_EQ(mismatches.load(), 0) << folder;
  }
}

// The word caches belong to one tokenizer: a tokenizer made after another is gone (perhaps at the
// same address) never sees the other's cached words.
TEST(TokenizersLm, WordCacheBelongsToItsTokenizer) {
  auto qwen_rows = reference("qwen2_bpe");
  auto fallback_rows = reference("fallback_bpe");
  for (int round = 0; round < 4; ++round) {
    const char* folder = round % 2 ? "fallback_bpe" : "qwen2_bpe";
    const auto& rows = round % 2 ? fallback_rows : qwen_rows;
    auto tok = load_text_tokenizer(kData / folder);
    for (size_t i = 0; i < 60; ++i)
      ASSERT_EQ(tok->encode(rows[i].text), rows[i].ids) << folder << i;
  }
}

TEST(TokenizersLm, DecodeRejectsUnknownIds) {
  auto qwen = load_text_tokenizer(kData / "qwen2_bpe");
  EXPECT_THROW(qwen->decode({5000}), Error);
  EXPECT_THROW(qwen->decode({-1}), Error);
  auto llama = load_text_tokenizer(kData / "llama_spm");
  EXPECT_THROW(llama->decode({1200}), Error);
}

// --- Malformed files: one error naming the file and the field. ---

class Malformed : public testing::Test {
 protected:
  void SetUp() override {
    dir_ =
        fs::temp_directory_path() / ("moetrace_tok_" + std::to_string(::getpid()) + "_" +
                                     testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::create_directories(dir_);
    std::ifstream in(kData / "qwen2_bpe/tokenizer.json");
    base_ = json::parse(in);
  }
  void TearDown() override { fs::remove_all(dir_); }
  // Writes j as dir_/tokenizer.json and expects loading it to fail with every part in the message.
  void expect_error(const json& j, const std::vector<std::string>& parts) {
    write(j.dump());
    expect_load_error(parts);
  }
  void write(const std::string& text, const char* name = "tokenizer.json") {
    std::ofstream(dir_ / name) << text;
  }
  void expect_load_error(std::vector<std::string> parts) {
    parts.push_back((dir_ / "tokenizer.json").string());
    try {
      load_text_tokenizer(dir_);
      ADD_FAILURE() << "no error";
    } catch (const Error& e) {
      std::string msg = e.what();
      for (const auto& p : parts) EXPECT_NE(msg.find(p), std::string::npos) << msg << " / " << p;
      EXPECT_EQ(msg.find('\n'), std::string::npos) << msg;
    }
  }
  fs::path dir_;
  json base_;
};

TEST_F(Malformed, NotJson) {
  write("{\"model\": ");
  expect_load_error({"not JSON"});
}

TEST_F(Malformed, MissingModel) {
  json j = base_;
  j.erase("model");
  expect_error(j, {"'model'", "missing"});
}

TEST_F(Malformed, UnsupportedModelType) {
  json j = base_;
  j["model"]["type"] = "WordPiece";
  expect_error(j, {"'model.type'", "WordPiece"});
}

TEST_F(Malformed, BadMerge) {
  json j = base_;
  j["model"]["merges"][3] = "onlyone";
  expect_error(j, {"'model.merges[3]'"});
  j["model"]["merges"][3] = json::array({"zzzq", "t"});
  expect_error(j, {"'model.merges[3]'", "zzzq", "not in model.vocab"});
}

TEST_F(Malformed, UnsupportedNormalizer) {
  json j = base_;
  j["normalizer"] = {{"type", "Lowercase"}};
  expect_error(j, {"'normalizer.type'", "Lowercase"});
  j["normalizer"] = {{"type", "Sequence"},
                     {"normalizers", {{{"type", "NFC"}}, {{"type", "Strip"}}}}};
  expect_error(j, {"'normalizer.normalizers[1].type'", "Strip"});
}

TEST_F(Malformed, BadPreTokenizer) {
  json j = base_;
  j["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = "(unclosed";
  expect_error(j, {"'pre_tokenizer.pretokenizers[0].pattern.Regex'", "does not compile"});
  j = base_;
  j["pre_tokenizer"]["pretokenizers"][0]["behavior"] = "MergedWithNext";
  expect_error(j, {"'pre_tokenizer.pretokenizers[0].behavior'", "MergedWithNext"});
  j = base_;
  j["pre_tokenizer"] = {{"type", "Whitespace"}};
  expect_error(j, {"'pre_tokenizer.type'", "Whitespace"});
}

TEST_F(Malformed, BadAddedToken) {
  json j = base_;
  j["added_tokens"][1]["single_word"] = true;
  expect_error(j, {"'added_tokens[1].single_word'"});
  j = base_;
  j["added_tokens"][0].erase("content");
  expect_error(j, {"'added_tokens[0].content'", "missing"});
}

TEST_F(Malformed, UnsupportedPostProcessorAndDecoder) {
  json j = base_;
  j["post_processor"] = {{"type", "RobertaProcessing"}};
  expect_error(j, {"'post_processor.type'", "RobertaProcessing"});
  j = base_;
  j["decoder"] = {{"type", "WordPiece"}};
  expect_error(j, {"'decoder.type'", "WordPiece"});
  j = base_;
  j["truncation"] = {{"max_length", 8}};
  expect_error(j, {"'truncation'"});
}

TEST_F(Malformed, ConfigTokenNotInVocabulary) {
  write(base_.dump());
  write(R"({"eos_token": "<|nope|>"})", "tokenizer_config.json");
  try {
    load_text_tokenizer(dir_);
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    std::string msg = e.what();
    EXPECT_NE(msg.find((dir_ / "tokenizer_config.json").string()), std::string::npos) << msg;
    EXPECT_NE(msg.find("'eos_token'"), std::string::npos) << msg;
  }
}

TEST_F(Malformed, SentencePieceModels) {
  // T5's unigram spiece.model is no Llama tokenizer.model.
  fs::copy_file(fs::path(MOETRACE_TEST_DATA) / "t5-spiece/spiece.model", dir_ / "tokenizer.model");
  try {
    load_text_tokenizer(dir_);
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    std::string msg = e.what();
    EXPECT_NE(msg.find((dir_ / "tokenizer.model").string()), std::string::npos) << msg;
    EXPECT_NE(msg.find("model_type"), std::string::npos) << msg;
  }
  write("not a protobuf at all", "tokenizer.model");
  EXPECT_THROW(load_text_tokenizer(dir_), Error);
}

TEST(TokenizersLm, NoTokenizerInDirectory) {
  try {
    load_text_tokenizer(kData);
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(kData.string()), std::string::npos) << e.what();
  }
}

TEST(TokenizersLm, Utf8Lossy) {
  EXPECT_EQ(text::utf8_lossy("ok \xe2\x82\xac"), "ok \xe2\x82\xac");
  // A truncated sequence is one U+FFFD; a lone continuation byte is one each.
  EXPECT_EQ(text::utf8_lossy("a\xe2\x82z"), "a\xef\xbf\xbdz");
  EXPECT_EQ(text::utf8_lossy("\x80\x80"), "\xef\xbf\xbd\xef\xbf\xbd");
  EXPECT_EQ(text::utf8_lossy("\xed\xa0\x80"), "\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd");  // surrogate
  EXPECT_FALSE(text::utf8_valid("\xc0\xaf"));
  EXPECT_TRUE(text::utf8_valid("\xf0\x9f\x98\x80"));
}

}  // namespace
}  // namespace moetrace
