// --device resolution (auto | cpu | cuda | cuda:N) and the progress line's layout.
#include <gtest/gtest.h>

#include <string>

#include "collect/launcher.h"
#include "collect/progress.h"
#include "core/error.h"

namespace moetrace {
namespace {

int never_asked() {
  ADD_FAILURE() << "visible_gpus asked although no GPU can be used";
  return 0;
}

std::string error_of(const std::string& device, bool built, int gpus) {
  try {
    resolve_device(device, 0, built, [&] { return gpus; });
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

TEST(ResolveDevice, AutoTakesAVisibleGpuElseTheCpu) {
  EXPECT_FALSE(resolve_device("auto", 0, false, never_asked).cuda);      // CPU-only build
  EXPECT_FALSE(resolve_device("auto", 0, true, [] { return 0; }).cuda);  // no driver or GPU
  const DeviceChoice one = resolve_device("auto", 0, true, [] { return 2; });
  EXPECT_TRUE(one.cuda);
  EXPECT_EQ(one.index, 0);
  EXPECT_EQ(one.name(), "cuda:0");
  // The launcher's local rank picks the GPU, modulo the visible ones.
  EXPECT_EQ(resolve_device("auto", 3, true, [] { return 2; }).index, 1);
  EXPECT_EQ(resolve_device("cuda", 2, true, [] { return 4; }).index, 2);
  EXPECT_FALSE(resolve_device("cpu", 0, true, never_asked).cuda);
  EXPECT_EQ(resolve_device("cpu", 0, true, never_asked).name(), "cpu");
}

TEST(ResolveDevice, CudaNParses) {
  const DeviceChoice c = resolve_device("cuda:1", 0, true, [] { return 2; });
  EXPECT_TRUE(c.cuda);
  EXPECT_EQ(c.index, 1);
  EXPECT_EQ(c.name(), "cuda:1");
  // An explicit GPU wins over the local rank.
  EXPECT_EQ(resolve_device("cuda:0", 1, true, [] { return 2; }).index, 0);
}

TEST(ResolveDevice, RefusalsAreOneLineNamingTheOption) {
  for (const auto& [device, built, gpus, needle] :
       {std::tuple{"gpu", true, 1, "expected auto, cpu, cuda or cuda:N"},
        std::tuple{"cuda:", true, 1, "expected cuda:N"}, std::tuple{"cuda:x", true, 1, "cuda:N"},
        std::tuple{"cuda:-1", true, 1, "cuda:N"},
        std::tuple{"cuda", false, 0, "built without the CUDA backend"},
        std::tuple{"cuda:0", false, 0, "built without the CUDA backend"},
        std::tuple{"cuda", true, 0, "no CUDA GPU is visible"},
        std::tuple{"cuda:1", true, 0, "no CUDA GPU is visible"},
        std::tuple{"cuda:2", true, 2, "sees 2 GPUs (cuda:0 to cuda:1)"}}) {
    const std::string e = error_of(device, built, gpus);
    EXPECT_NE(e.find("--device"), std::string::npos) << device << ": " << e;
    EXPECT_NE(e.find(needle), std::string::npos) << device << ": " << e;
    EXPECT_EQ(e.find('\n'), std::string::npos) << e;
    EXPECT_EQ(e.find("Cuda"), std::string::npos) << e;  // no internal class (CudaSwitchModel)
  }
}

TEST(ProgressLine, SyntheticRunsShowNoEmptyFields) {
  // Synthetic samples run no engine: no "0 tokens/s", no empty dataset between commas.
  const std::string t = progress_text(40, 40, 6, 0, 1.5, 0, "");
  EXPECT_EQ(t, "40/40 samples, 240 traces");
  EXPECT_EQ(progress_text(10, 40, 6, 3000, 2.0, 6.4, "glue/mrpc"),
            "10/40 samples, 60 traces, 1500 tokens/s, glue/mrpc, ETA 6 s");
}

TEST(ProgressLine, FitsTheTerminal) {
  const std::string text = progress_text(123456, 1000000, 12, 98765432, 10.0, 3600,
                                         "a/very-long-dataset-name/with-a-config");
  for (int columns : {20, 40, 60, 80, 100, 200}) {
    const std::string line = progress_bar_line(0.5, text, columns);
    EXPECT_LE(static_cast<int>(line.size()), columns - 1) << columns << ": " << line;
  }
  // Wide terminals get the whole bar and the whole text.
  const std::string wide = progress_bar_line(0.5, text, 200);
  EXPECT_EQ(wide.substr(0, 32), "[" + std::string(15, '#') + std::string(15, '.') + "]");
  EXPECT_NE(wide.find(text), std::string::npos);
  // Narrow ones lose the bar before any text.
  EXPECT_EQ(progress_bar_line(0.5, "12/40 samples", 16), "12/40 samples");
}

}  // namespace
}  // namespace moetrace
