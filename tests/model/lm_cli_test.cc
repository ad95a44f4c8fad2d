// `moetrace forward` on an LM directory: chosen by config.json's model_type, it writes the
// reference's keys (the values are lm_parity_test's business: here, that the CLI path is the same
// engine), and refuses a reduced precision on the CPU in one line.
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <cstdio>
#include <cstring>
#include <filesystem>

#include "io/safetensors.h"
#include "model/lm/lm_forward.h"

namespace moetrace {
namespace {

namespace fs = std::filesystem;
const fs::path kFixtures = fs::path(MOETRACE_TEST_DATA) / "fixtures_lm";

int run_cli(const std::string& args, std::string* out) {
  const std::string cmd = std::string(MOETRACE_CLI) + " " + args + " 2>&1";
  FILE* p = ::popen(cmd.c_str(), "r");
  if (p == nullptr) return -1;
  char buf[4096];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof(buf), p)) > 0) out->append(buf, n);
  const int status = ::pclose(p);
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

TEST(LmCli, ForwardWritesWhatTheLibraryComputes) {
  const fs::path dir = kFixtures / "mixtral";
  const fs::path out = fs::temp_directory_path() / "lm_cli_test_out.safetensors";
  std::string log;
  ASSERT_EQ(run_cli("forward --model " + (dir / "model_hub").string() + " --inputs " +
                        (dir / "inputs.safetensors").string() + " --output " + out.string() +
                        " --generate 3",
                    &log),
            0)
      << log;
  SafetensorsFile f = SafetensorsFile::open(out);
  const auto expect = run_lm_forward(*LmModel::load(dir / "model_hub"),
                                     read_forward_inputs(dir / "inputs.safetensors"), 3);
  ASSERT_EQ(f.tensors().size(), expect.size());
  for (const auto& [name, t] : expect) {
    const NamedView* v = f.find(name);
    ASSERT_NE(v, nullptr) << name;
    ASSERT_EQ(v->view.shape, t.shape()) << name;
    ASSERT_EQ(v->view.dtype, t.dtype()) << name;
    EXPECT_EQ(std::memcmp(v->view.data, t.raw(), t.nbytes()), 0) << name;
  }
  EXPECT_EQ(f.find("generated_ids")->view.shape, (Shape{4, 14 + 3}));
  fs::remove(out);
}

TEST(LmCli, ReducedPrecisionNeedsAGpu) {
  const fs::path dir = kFixtures / "olmoe";
  const std::string base = "forward --model " + (dir / "model").string() + " --inputs " +
                           (dir / "inputs.safetensors").string() + " --output " +
                           (fs::temp_directory_path() / "lm_cli_never.safetensors").string();
  std::string log;
  EXPECT_NE(run_cli(base + " --device cpu --precision bf16", &log), 0);
  EXPECT_NE(log.find("--precision bf16: the CPU engine computes in fp32 only"), std::string::npos)
      << log;
}

}  // namespace
}  // namespace moetrace
