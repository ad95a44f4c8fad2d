// Which BLAS the CPU engine runs on, for the trace store's manifest ("engine.blas"): another build
// or another kernel choice can round the same sums differently.
#pragma once

#include <string>

namespace moetrace::cpu {

// The BLAS build and the kernel it picked for this CPU, e.g. "OpenBLAS 0.3.26 DYNAMIC_ARCH
// NO_AFFINITY Haswell MAX_THREADS=64".
std::string blas_config();

}  // namespace moetrace::cpu
