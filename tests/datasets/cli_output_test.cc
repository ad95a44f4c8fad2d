// The exact text of `moetrace datasets list` and `datasets check`: columns that never run together
// (papercuts issue, item 14), no double space for a dataset without a config.
#include <gtest/gtest.h>

#include <cstdio>
#include <filesystem>
#include <string>

namespace {

namespace fs = std::filesystem;

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

TEST(CliOutput, DatasetsListColumnsAreAlignedAndApart) {
  int rc = -1;
  const std::string out =
      run(std::string(MOETRACE_CLI) +
              " datasets list --datasets yahoo_answers_topics,glue/mrpc,billsum",
          &rc);
  EXPECT_EQ(rc, 0);
  const std::string table =
      "name                  hub                                      config                split  "
      "     category        quota  template\n"
      "billsum               FiscalNote/billsum                       -                     test   "
      "     core            200    summarize: {text}\n"
      "glue/mrpc             nyu-mll/glue                             mrpc                  "
      "validation  glue            150    mrpc sentence1: {sentence1} sentence2: {sentence2}\n"
      "yahoo_answers_topics  community-datasets/yahoo_answers_topics  yahoo_answers_topics  test   "
      "     classification  150    classify topic: {question_title} {question_content?} "
      "answer: {best_answer}\n";
  ASSERT_GE(out.size(), table.size());
  EXPECT_EQ(out.substr(0, table.size()), table);
  EXPECT_TRUE(
      out.substr(table.size()).starts_with("3 datasets, quotas total 500; groups: maximum core "))
      << out.substr(table.size());
}

TEST(CliOutput, DatasetsCheckNamesAMissingDatasetWithoutADoubleSpace) {
  const fs::path empty = fs::temp_directory_path() / "mt_cli_output_empty_root";
  fs::create_directories(empty);
  int rc = -1;
  const std::string out = run(std::string(MOETRACE_CLI) +
                                  " --log-level off datasets check --no-hf-cache --datasets "
                                  "billsum,glue/mrpc --data-root " +
                                  empty.string(),
                              &rc);
  EXPECT_EQ(rc, 0);
  EXPECT_EQ(out,
            "billsum: missing (looked for FiscalNote/billsum test; `moetrace fetch --datasets "
            "billsum`)\n"
            "glue/mrpc: missing (looked for nyu-mll/glue mrpc validation; `moetrace fetch "
            "--datasets glue/mrpc`)\n"
            "0 of 2 datasets present\n");
}

}  // namespace
