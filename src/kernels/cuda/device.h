// How many GPUs this process can see, asked without throwing: used to pick a device (--device
// auto) on machines that may have no driver at all. The CPU-only build never includes this header
// (src/collect/launcher.cc answers 0 there).
#pragma once

namespace moetrace::cuda {

// GPUs this process can see (CUDA_VISIBLE_DEVICES applies); 0 without a driver or a GPU. Never
// throws, and leaves no sticky CUDA error behind.
int device_count();

}  // namespace moetrace::cuda
