#!/usr/bin/env bash
# The GPU check, in one call on the device machine (see docs/GPU.md): builds the CUDA backend, runs
# the GPU tests (tests/cuda) and the benchmarks (bench/bench_gpu, bench/hf_switch_bench.py).
#
#   bash scripts/gpu_check.sh --pack        here, once: bundle the build dependencies the device image
#                                           may lack into .gpudeps/deps.tar.xz (ignored; pass
#                                           carry=[".gpudeps"] to the device call)
#   bash scripts/gpu_check.sh [steps...]    on the device; steps: env build test bench hf ncu
#                                           (default: env build test bench hf)
#
# The device image is bare and offline. Only the GPU engine's part of the project is built there
# (core, io, kernels, model, the CUDA targets, cuda_tests, bench_gpu), from a generated CMake project,
# so the device needs none of the data/trace/text dependencies. Results land in $OUT (default
# ./gpu-out): logs, gtest XML, benchmark JSON.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-$ROOT/gpu-out}
mkdir -p "$OUT"
BUILD=${MOETRACE_GPU_BUILD:-/tmp/moetrace-gpu-build}
DEPS=/tmp/gpudeps

if [[ "${1:-}" == "--pack" ]]; then
  mkdir -p "$ROOT/.gpudeps"
  grep -qx '/.gpudeps/' "$ROOT/.git/info/exclude" 2>/dev/null || echo '/.gpudeps/' >>"$ROOT/.git/info/exclude"
  L=usr/lib/x86_64-linux-gnu
  cd /
  tar -cJf "$ROOT/.gpudeps/deps.tar.xz" usr/include/nlohmann usr/share/cmake/nlohmann_json \
    usr/include/gtest usr/include/gmock $L/libgtest.a $L/libgtest_main.a $L/libgmock.a $L/libgmock_main.a $L/cmake/GTest \
    $L/openblas-openmp/libopenblas.so $L/openblas-openmp/libopenblas.so.0 $L/openblas-openmp/libopenblasp-r0.3.21.so \
    usr/include/x86_64-linux-gnu/openblas-openmp $L/libgfortran.so.5 $L/libgfortran.so.5.0.0 $L/libquadmath.so.0 \
    $L/libquadmath.so.0.0.0 usr/include/openssl usr/include/x86_64-linux-gnu/openssl $L/libcrypto.so $L/libcrypto.so.3 \
    $L/libssl.so $L/libssl.so.3
  ls -la "$ROOT/.gpudeps"
  exit 0
fi

steps=("$@")
[[ ${#steps[@]} -eq 0 ]] && steps=(env build test bench hf)
has() { local s; for s in "${steps[@]}"; do [[ $s == "$1" ]] && return 0; done; return 1; }
export PATH=/usr/local/cuda/bin:$PATH
NPROC=$(nproc)

if has env; then
  {
    echo "== date: $(date -u +%FT%TZ)"
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    nvcc --version | tail -2
    cmake --version | head -1
    ninja --version 2>/dev/null | sed 's/^/ninja /'
    g++ --version | head -1
    grep PRETTY_NAME /etc/os-release
    ldd --version | head -1
    python3 -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'
    for f in /usr/include/nlohmann/json.hpp /usr/include/gtest/gtest.h /usr/include/openssl/sha.h /usr/include/cblas.h; do
      [[ -e $f ]] && echo "have $f" || echo "MISSING $f"
    done
  } 2>&1 | tee "$OUT/env.txt"
fi

# Dependencies the image lacks come from the carried bundle.
cmake_args=()
if [[ ! -e /usr/include/nlohmann/json.hpp || ! -e /usr/include/gtest/gtest.h || ! -e /usr/include/openssl/sha.h ]]; then
  if [[ -e $ROOT/.gpudeps/deps.tar.xz ]]; then
    mkdir -p $DEPS && tar -xJf "$ROOT/.gpudeps/deps.tar.xz" -C $DEPS
    cmake_args+=(-DCMAKE_PREFIX_PATH=$DEPS/usr)
    [[ -e /usr/include/openssl/sha.h ]] || cmake_args+=(-DOPENSSL_ROOT_DIR=$DEPS/usr)
    export LD_LIBRARY_PATH=$DEPS/usr/lib/x86_64-linux-gnu/openblas-openmp:$DEPS/usr/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}
  else
    echo "missing build dependencies and no .gpudeps/deps.tar.xz (run --pack here, carry .gpudeps)"
  fi
fi
if [[ -e $DEPS/usr/lib/x86_64-linux-gnu/openblas-openmp/libopenblas.so ]]; then
  cmake_args+=(-DMOETRACE_OPENBLAS_OMP=$DEPS/usr/lib/x86_64-linux-gnu/openblas-openmp/libopenblas.so
    -DMOETRACE_CBLAS_INCLUDE=$DEPS/usr/include/x86_64-linux-gnu/openblas-openmp)
fi

if has build; then
  mkdir -p $BUILD/src
  # A CMake project holding only the GPU engine's targets, reusing the repository's folders.
  cat >$BUILD/src/CMakeLists.txt <<CMAKE
cmake_minimum_required(VERSION 3.25)
project(moetrace_gpu VERSION 0.1.0 LANGUAGES C CXX)
set(PROJECT_SOURCE_DIR $ROOT)
set(CMAKE_CXX_STANDARD 20)
set(CMAKE_CXX_STANDARD_REQUIRED ON)
set(CMAKE_CXX_EXTENSIONS OFF)
set(MOETRACE_WERROR OFF)
set(MOETRACE_SANITIZE OFF)
set(MOETRACE_CUDA ON)
include($ROOT/cmake/moetrace.cmake)
moetrace_enable_cuda()
find_package(OpenMP REQUIRED)
find_package(nlohmann_json REQUIRED)
find_package(Threads REQUIRED)
find_package(OpenSSL REQUIRED)
moetrace_find_blas()
foreach(dir core io kernels/cpu model trace kernels/cuda model/cuda)
  string(REPLACE "/" "_" bin \${dir})
  add_subdirectory($ROOT/src/\${dir} \${bin})
endforeach()
add_library(moetrace_all INTERFACE)
foreach(lib moetrace_core moetrace_io moetrace_kernels_cpu moetrace_model moetrace_trace moetrace_cuda moetrace_model_cuda)
  if(TARGET \${lib})
    target_link_libraries(moetrace_all INTERFACE \${lib})
  endif()
endforeach()
find_package(GTest REQUIRED)
file(GLOB cuda_test_srcs $ROOT/tests/cuda/*_test.cc)
add_executable(cuda_tests \${cuda_test_srcs})
target_include_directories(cuda_tests PRIVATE $ROOT/tests)
target_compile_definitions(cuda_tests PRIVATE MOETRACE_TEST_DATA="$ROOT/tests/data" MOETRACE_SOURCE_DIR="$ROOT")
target_link_libraries(cuda_tests PRIVATE moetrace_all GTest::gtest_main)
file(GLOB bench_gpu_srcs $ROOT/bench/bench_gpu*.cc)
if(bench_gpu_srcs AND TARGET moetrace_model_cuda)
  add_executable(bench_gpu \${bench_gpu_srcs})
  target_link_libraries(bench_gpu PRIVATE moetrace_all)
endif()
CMAKE
  t0=$(date +%s)
  set -o pipefail
  cmake -S $BUILD/src -B $BUILD -G Ninja -DCMAKE_BUILD_TYPE=Release "${cmake_args[@]}" 2>&1 | tee "$BUILD/configure.log" | tail -15 || exit 1
  targets=(cuda_tests)
  grep -q '^build bench_gpu' $BUILD/build.ninja 2>/dev/null && targets+=(bench_gpu)
  cmake --build $BUILD -j "$NPROC" --target "${targets[@]}" 2>&1 | tee "$BUILD/build.log" | grep -E "error|warning: |FAILED" | head -40
  [[ ${PIPESTATUS[0]} -eq 0 ]] || { echo "BUILD FAILED"; tail -30 "$BUILD/build.log"; exit 1; }
  echo "== build: $(( $(date +%s) - t0 )) s"
fi

if has test; then
  $BUILD/cuda_tests --gtest_output=xml:"$OUT/cuda_tests.xml" 2>&1 | tee "$OUT/tests.log" | grep -E "^\[  (FAILED|PASSED|SKIPPED) |Failure|error|Expected|Which is|rel|^\[==" | head -80
fi

if has bench && [[ -x $BUILD/bench_gpu ]]; then
  [[ -e /tmp/moetrace_mix.txt ]] || python3 $ROOT/bench/hf_switch_bench.py --write-mix
  $BUILD/bench_gpu --json "$OUT/bench_gpu.json" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log" | tail -40
fi

if has hf && [[ -e $ROOT/bench/hf_switch_bench.py ]]; then
  PYTHONUNBUFFERED=1 python3 $ROOT/bench/hf_switch_bench.py --json "$OUT/hf_bench.json" ${HF_ARGS:-} 2>&1 | tee "$OUT/hf.log" | tail -25
fi

if has ncu && [[ -x $BUILD/bench_gpu ]]; then
  # Kernel durations of one 128x256 batch (bench_gpu --ncu brackets it with cudaProfilerStart/Stop).
  ncu --clock-control none --profile-from-start off --metrics gpu__time_duration.sum --csv \
    $BUILD/bench_gpu --ncu >"$BUILD/ncu.csv" 2>"$BUILD/ncu.err"
  python3 - "$BUILD/ncu.csv" <<'PY' | tee "$OUT/ncu_summary.txt"
import csv, sys, collections
rows = [r for r in csv.reader(open(sys.argv[1])) if len(r) > 10]
hdr = rows[0]; name_i = hdr.index("Kernel Name"); val_i = hdr.index("Metric Value"); unit_i = hdr.index("Metric Unit")
tot = collections.defaultdict(float); cnt = collections.Counter()
for r in rows[1:]:
    v = float(r[val_i].replace(",", "")); u = r[unit_i]
    v *= {"ns": 1e-3, "us": 1, "usecond": 1, "nsecond": 1e-3, "ms": 1e3, "msecond": 1e3}.get(u, 1)
    k = r[name_i][:90]; tot[k] += v; cnt[k] += 1
all_us = sum(tot.values())
print(f"total kernel time of one batch: {all_us/1e3:.2f} ms")
for k, v in sorted(tot.items(), key=lambda x: -x[1])[:18]:
    print(f"{v/1e3:8.3f} ms {100*v/all_us:5.1f}% x{cnt[k]:<4} {k}")
PY
fi
