// Which device an engine runs on: --device auto | cpu | cuda | cuda:N, resolved once.
#pragma once

#include <functional>
#include <string>

namespace moetrace {

struct DeviceChoice {
  bool cuda = false;
  int index = 0;  // the GPU (CUDA ordinal) when cuda
  std::string name() const { return cuda ? "cuda:" + std::to_string(index) : "cpu"; }
};

// auto: the GPU when built with CUDA and one is visible (local_rank modulo the visible GPUs: the
// first for a single process), else the CPU. cuda: the same GPU, or Error when none is usable;
// cuda:N: GPU N. `visible_gpus` is asked only when a GPU could be used. Error (one line naming
// --device) for anything else, a CPU-only build asked for cuda, no GPU, or N out of range.
DeviceChoice resolve_device(const std::string& device, int local_rank, bool built_with_cuda,
                            const std::function<int()>& visible_gpus);
// The same for this build and this process's GPUs.
DeviceChoice resolve_device(const std::string& device, int local_rank);
// GPUs this process sees: 0 in a CPU-only build, without a driver or without a GPU. Never throws.
int visible_cuda_devices();
bool built_with_cuda();

}  // namespace moetrace
