// The `moetrace tokenize` and `moetrace datasets` subcommands, run as a user would.
#include <gtest/gtest.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>

namespace {

namespace fs = std::filesystem;
const fs::path kData = MOETRACE_TEST_DATA;
const fs::path kSource = MOETRACE_SOURCE_DIR;

// stdout of a shell command; *rc gets its exit status.
std::string run(const std::string& cmd, int* rc) {
  std::string out;
  FILE* p = popen(cmd.c_str(), "r");
  if (!p) return out;
  char buf[1 << 14];
  size_t n;
  while ((n = fread(buf, 1, sizeof(buf), p)) > 0) out.append(buf, n);
  int status = pclose(p);
  *rc = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return out;
}

std::vector<std::string> lines(const std::string& s) {
  std::vector<std::string> out;
  size_t start = 0;
  for (size_t nl; (nl = s.find('\n', start)) != std::string::npos; start = nl + 1) {
    out.push_back(s.substr(start, nl - start));
  }
  return out;
}

TEST(Cli, TokenizeMatchesTheReference) {
  const fs::path in = fs::temp_directory_path() / "mt_cli_tokenize.jsonl";
  std::vector<std::vector<int>> expected;
  {
    std::ifstream ref(kData / "t5-spiece/t5_tokenizer_reference.jsonl");
    std::ofstream out(in);
    std::string line;
    while (std::getline(ref, line)) {
      auto row = nlohmann::json::parse(line);
      out << nlohmann::json{{"text", row["text"]}}.dump() << '\n';
      expected.push_back(row["auto"].get<std::vector<int>>());
    }
  }
  int rc = -1;
  auto out = lines(run(std::string(MOETRACE_CLI) + " tokenize --spm " +
                           (kData / "t5-spiece/spiece.model").string() + " --input " + in.string(),
                       &rc));
  EXPECT_EQ(rc, 0);
  ASSERT_EQ(out.size(), expected.size());
  for (size_t i = 0; i < out.size(); ++i) {
    EXPECT_EQ(nlohmann::json::parse(out[i])["ids"].get<std::vector<int>>(), expected[i]) << i;
  }
  fs::remove(in);
}

TEST(Cli, TokenizeMaxLengthAndErrors) {
  int rc = -1;
  auto out = run("echo '{\"text\": \"translate English to German: The house is wonderful.\"}' | " +
                     std::string(MOETRACE_CLI) + " tokenize --model demo --max-length 4",
                 &rc);
  EXPECT_EQ(rc, 0);
  EXPECT_EQ(out, "{\"ids\":[13959,1566,12,1]}\n");
  run("echo 'not json' | " + std::string(MOETRACE_CLI) + " tokenize --model demo 2>/dev/null", &rc);
  EXPECT_NE(rc, 0);
  run(std::string(MOETRACE_CLI) + " tokenize --spm /nonexistent.model </dev/null 2>/dev/null", &rc);
  EXPECT_NE(rc, 0);
}

TEST(Cli, DatasetsPlanIsReproducible) {
  const std::string cmd = std::string(MOETRACE_CLI) +
                          " --log-level off datasets plan --no-hf-cache --datasets demo " +
                          "--data-root " + (kSource / "assets/demo/data").string() + " --seed 7";
  int rc1 = -1, rc2 = -1;
  auto a = run(cmd, &rc1);
  auto b = run(cmd + " --threads 1", &rc2);
  EXPECT_EQ(rc1, 0);
  EXPECT_EQ(rc2, 0);
  EXPECT_EQ(a, b);
  auto rows = lines(a);
  EXPECT_GE(rows.size(), 1000u);
  auto first = nlohmann::json::parse(rows.at(0));
  EXPECT_TRUE(first.contains("sample_id"));
  EXPECT_TRUE(first.contains("text"));
}

TEST(Cli, DatasetsListAndCheck) {
  int rc = -1;
  auto list = run(std::string(MOETRACE_CLI) + " datasets list --json", &rc);
  EXPECT_EQ(rc, 0);
  EXPECT_EQ(lines(list).size(), 62u);
  auto check =
      run(std::string(MOETRACE_CLI) +
              " --log-level off datasets check --no-hf-cache --json --datasets demo,imdb " +
              "--data-root " + (kSource / "assets/demo/data").string(),
          &rc);
  EXPECT_EQ(rc, 0);
  int present = 0, missing = 0;
  for (const auto& l : lines(check)) {
    auto r = nlohmann::json::parse(l);
    if (r["status"] == "present") {
      ++present;
      EXPECT_TRUE(r["missing_fields"].empty()) << l;
      EXPECT_GT(r["files"][0]["rows"].get<int>(), 0) << l;
    } else {
      ++missing;
    }
  }
  EXPECT_EQ(present, 10);
  EXPECT_EQ(missing, 1);
}

}  // namespace
