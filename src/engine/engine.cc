// make_engine(): the one place that knows which engines this build has.
#include "engine/engine.h"

#include <algorithm>
#include <optional>

#include "core/error.h"
#include "core/log.h"
#include "engine/backends.h"
#include "model/cpu_engine.h"
#include "model/lm/lm_engine.h"
#include "model/lm/lm_forward.h"
#ifdef MOETRACE_WITH_CUDA
#include "kernels/cuda/device.h"
#endif

namespace moetrace {

bool built_with_cuda() {
#ifdef MOETRACE_WITH_CUDA
  return true;
#else
  return false;
#endif
}

int visible_cuda_devices() {
#ifdef MOETRACE_WITH_CUDA
  return cuda::device_count();
#else
  return 0;
#endif
}

namespace {

// The CPU engines compute in fp32 only.
void check_cpu_precision(const EngineOptions& options) {
  if (options.precision != DType::kF32)
    fail("--precision ", precision_name(options.precision),
         ": the CPU engine computes in fp32 only; use --precision fp32 or a GPU");
}

#ifndef MOETRACE_WITH_CUDA
[[noreturn]] void fail_without_cuda(const EngineOptions& options) {
  fail("--device ", options.device.name(),
       ": this moetrace was built without the CUDA backend (no nvcc found); use --device cpu");
}
#endif

}  // namespace

std::unique_ptr<Engine> make_engine(const EngineOptions& options, const SwitchConfig& config,
                                    std::shared_ptr<TensorSource> weights) {
  if (!options.device.cuda) {
    check_cpu_precision(options);
    return cpu_engine(SwitchModel::from_source(config, std::move(weights), options.load));
  }
#ifdef MOETRACE_WITH_CUDA
  return make_cuda_engine(options, config, std::move(weights));
#else
  fail_without_cuda(options);
#endif
}

std::unique_ptr<Engine> make_lm_engine(const EngineOptions& options,
                                       const std::filesystem::path& dir) {
  if (!options.device.cuda) {
    check_cpu_precision(options);
    return lm_cpu_engine(LmModel::load(dir));
  }
#ifdef MOETRACE_WITH_CUDA
  return make_cuda_lm_engine(options, dir);
#else
  fail_without_cuda(options);
#endif
}

std::map<std::string, Tensor> lm_forward(const EngineOptions& options,
                                         const std::filesystem::path& dir, const ForwardInputs& in,
                                         int64_t generate) {
  if (!options.device.cuda) {
    check_cpu_precision(options);
    const auto model = LmModel::load(dir);
    log_info(model->config().summary(), "; experts ", model->weights().expert_layout);
    return run_lm_forward(*model, in, generate);
  }
#ifdef MOETRACE_WITH_CUDA
  return cuda_lm_forward(options, dir, in, generate);
#else
  fail_without_cuda(options);
#endif
}

std::string precision_name(DType precision) {
  return precision == DType::kF32 ? "fp32" : precision == DType::kF16 ? "fp16" : "bf16";
}

DeviceChoice resolve_device(const std::string& device, int local_rank) {
  return resolve_device(device, local_rank, built_with_cuda(), visible_cuda_devices);
}

DeviceChoice resolve_device(const std::string& device, int local_rank, bool built,
                            const std::function<int()>& visible_gpus) {
  DeviceChoice c;
  if (device == "cpu") return c;
  const bool automatic = device == "auto";
  std::optional<int> index;
  if (device.rfind("cuda:", 0) == 0) {
    const std::string digits = device.substr(5);
    const bool ok =
        !digits.empty() && digits.size() <= 4 &&
        std::all_of(digits.begin(), digits.end(), [](char ch) { return ch >= '0' && ch <= '9'; });
    if (!ok) fail("--device '", device, "': expected cuda:N with N a GPU number (0, 1, ...)");
    index = std::stoi(digits);
  } else if (!automatic && device != "cuda") {
    fail("--device '", device, "': expected auto, cpu, cuda or cuda:N");
  }
  if (!built) {
    if (automatic) return c;
    fail("--device ", device,
         ": this moetrace was built without the CUDA backend (no nvcc found); use --device cpu");
  }
  const int n = visible_gpus();
  if (n < 1) {
    if (automatic) return c;
    fail("--device ", device,
         ": no CUDA GPU is visible (no NVIDIA driver, no GPU, or CUDA_VISIBLE_DEVICES hides them); "
         "use --device cpu");
  }
  if (index && *index >= n) {
    fail("--device ", device, ": this process sees ", n, n == 1 ? " GPU" : " GPUs", " (cuda:0",
         n > 1 ? " to cuda:" + std::to_string(n - 1) : std::string(), ")");
  }
  c.cuda = true;
  c.index = index ? *index : local_rank % n;
  return c;
}

}  // namespace moetrace
