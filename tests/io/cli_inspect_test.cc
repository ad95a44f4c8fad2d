// `moetrace inspect` on good and bad checkpoints: bad input is one "moetrace: error:" line and a
// non-zero exit, never a crash. Skipped until the CLI has the inspect subcommand.
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <cstdio>

#include "io/io_test_util.h"

namespace moetrace {
namespace {

namespace fs = std::filesystem;

struct CliRun {
  int status = -1;     // exit code, or -1 when it did not exit normally (a crash)
  std::string output;  // stdout and stderr
};

CliRun run_cli(const std::string& args) {
  CliRun r;
  const std::string cmd = std::string("'") + MOETRACE_CLI + "' " + args + " 2>&1";
  FILE* p = ::popen(cmd.c_str(), "r");
  if (p == nullptr) return r;
  char buf[4096];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, p)) > 0) r.output.append(buf, n);
  const int st = ::pclose(p);
  r.status = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
  return r;
}

bool cli_has_inspect() { return fs::exists(MOETRACE_CLI) && run_cli("inspect --help").status == 0; }

TEST(CliInspect, ReadsTorchAndSafetensorsModels) {
  ASSERT_TRUE(cli_has_inspect()) << "moetrace inspect is not built: " << MOETRACE_CLI;
  testing::TempDir tmp("cli_ok");
  fs::create_symlink(testing::kData / "fixtures/tiny-a/model/pytorch_model.bin",
                     tmp / "pytorch_model.bin");
  fs::copy_file(testing::kData / "fixtures/tiny-a/model/config.json", tmp / "config.json");
  for (const fs::path& dir : {fs::path(tmp.path()), testing::kData / "fixtures/tiny-a/model"}) {
    const CliRun r = run_cli("inspect '" + dir.string() + "'");
    EXPECT_EQ(r.status, 0) << r.output;
  }
}

TEST(CliInspect, BadCheckpointsGiveOneErrorLine) {
  ASSERT_TRUE(cli_has_inspect()) << "moetrace inspect is not built: " << MOETRACE_CLI;
  const std::pair<const char*, const char*> cases[] = {
      {"crafted_os_system.pt", "os.system"},
      {"crafted_missing_storage.pt", "missing"},
      {"crafted_extent.pt", "past its storage"},
      {"crafted_compressed.pt", "compressed"},
  };
  for (const auto& [file, needle] : cases) {
    testing::TempDir tmp("cli_bad");
    fs::create_symlink(testing::kData / "io" / file, tmp / "pytorch_model.bin");
    fs::copy_file(testing::kData / "fixtures/tiny-a/model/config.json", tmp / "config.json");
    const CliRun r = run_cli("inspect '" + tmp.path().string() + "'");
    EXPECT_GT(r.status, 0) << file << ": " << r.output;
    EXPECT_NE(r.output.find("moetrace: error: "), std::string::npos) << file << ": " << r.output;
    EXPECT_NE(r.output.find(needle), std::string::npos) << file << ": " << r.output;
  }
}

}  // namespace
}  // namespace moetrace
