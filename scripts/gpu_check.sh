#!/usr/bin/env bash
# The GPU check, in one call on the device machine (see docs/GPU.md): builds the CUDA backend, runs
# the GPU tests (tests/cuda) and the benchmarks (bench/bench_gpu, bench/hf_switch_bench.py).
#
#   bash scripts/gpu_check.sh --pack        here, once: bundle the build dependencies the device image
#                                           may lack into .gpudeps/deps.tar.xz (ignored; pass
#                                           carry=[".gpudeps"] to the device call)
#   bash scripts/gpu_check.sh [steps...]    on the device; steps: env build test forward bench hf ncu collect
#                                           scale lm fidelity precisions baselines libs (default: env build
#                                           test forward bench hf)
#
# lm: the MoE language models alone (issue 20): the LM GPU tests (tests/cuda/lm_*), the LM ops of
# the backend test, and bench/bench_lm_gpu (OLMoE-1B-7B and Mixtral-8x7B prefill, LM_BENCH_ARGS
# passed on); e.g. `bash scripts/gpu_check.sh env build lm`.
#
# Knobs: FIDELITY_ARGS (more bench/fidelity.py options, e.g. --precisions fp32,mixed,faithful),
# FIDELITY_SEEDS ("1 2": more weight draws of the same measurement), ROUNDING_VARIANTS (default
# "all points h"), PRECISION_SHAPES (the precisions step's bench_gpu shapes), FORWARD_DEVICE=cpu
# (the forward step on the CPU engine, to check the step itself here).
#
# The device image is bare and offline: the carried bundle supplies what it lacks (OpenBLAS,
# SentencePiece, CLI11, ...) and the image's pyarrow wheel supplies Arrow C++, so the whole project
# (the `moetrace` CLI included) is built there; if that fails, the GPU engine's part alone (core, io,
# kernels, model, trace, the CUDA targets, cuda_tests, bench_gpu) from a generated CMake project.
# Results land in $OUT (default ./gpu-out): logs, gtest XML, benchmark JSON. GPU_TARGETS="moetrace
# cuda_tests ..." builds only those targets (a short device call).
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
  # zlib and zstd go to linkonly/: the device has their runtime libraries, and Debian's must not
  # shadow them (LD_LIBRARY_PATH) for the image's Python and PyTorch.
  tar -cJf "$ROOT/.gpudeps/deps.tar.xz" usr/include/nlohmann usr/share/cmake/nlohmann_json \
    usr/include/gtest usr/include/gmock $L/libgtest.a $L/libgtest_main.a $L/libgmock.a $L/libgmock_main.a $L/cmake/GTest \
    $L/openblas-openmp/libopenblas.so $L/openblas-openmp/libopenblas.so.0 $L/openblas-openmp/libopenblasp-r0.3.21.so \
    usr/include/x86_64-linux-gnu/openblas-openmp $L/libgfortran.so.5 $L/libgfortran.so.5.0.0 $L/libquadmath.so.0 \
    $L/libquadmath.so.0.0.0 usr/include/openssl usr/include/x86_64-linux-gnu/openssl $L/libcrypto.so $L/libcrypto.so.3 \
    $L/libssl.so $L/libssl.so.3 \
    usr/include/sentencepiece_processor.h $L/libsentencepiece.so $L/libsentencepiece.so.0 $L/libsentencepiece.so.0.0.0 \
    usr/include/unicode $L/libicuuc.so $L/libicuuc.so.72 $L/libicuuc.so.72.1 $L/libicui18n.so $L/libicui18n.so.72 \
    $L/libicui18n.so.72.1 $L/libicudata.so $L/libicudata.so.72 $L/libicudata.so.72.1 \
    --transform "s,^usr/include/CLI,cli11/CLI," usr/include/CLI usr/include/zlib.h usr/include/zconf.h usr/include/zstd.h usr/include/zstd_errors.h \
    --transform "s,^$L/libz\\.so,linkonly/libz.so," --transform "s,^$L/libzstd,linkonly/libzstd," \
    $L/libz.so $L/libz.so.1 $L/libz.so.1.2.13 $L/libzstd.so $L/libzstd.so.1 $L/libzstd.so.1.5.4
  ls -la "$ROOT/.gpudeps"
  exit 0
fi

steps=("$@")
[[ ${#steps[@]} -eq 0 ]] && steps=(env build test forward bench hf)
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

# Dependencies the image lacks come from the carried bundle (scripts/gpu_check.sh --pack).
cmake_args=()
cxx_flags=""
if [[ -e $ROOT/.gpudeps/deps.tar.xz ]]; then
  mkdir -p $DEPS && tar -xJf "$ROOT/.gpudeps/deps.tar.xz" -C $DEPS
  L=$DEPS/usr/lib/x86_64-linux-gnu
  cmake_args+=(-DCMAKE_PREFIX_PATH=$DEPS/usr -DMOETRACE_OPENBLAS_OMP=$L/openblas-openmp/libopenblas.so
    -DMOETRACE_CBLAS_INCLUDE=$DEPS/usr/include/x86_64-linux-gnu/openblas-openmp)
  [[ -e /usr/include/openssl/sha.h ]] || cmake_args+=(-DOPENSSL_ROOT_DIR=$DEPS/usr)
  [[ -e /usr/include/zlib.h ]] || cmake_args+=(-DZLIB_LIBRARY=$DEPS/linkonly/libz.so -DZLIB_INCLUDE_DIR=$DEPS/usr/include)
  [[ -e /usr/include/zstd.h ]] || cmake_args+=(-DMOETRACE_ZSTD_LIB=$DEPS/linkonly/libzstd.so -DMOETRACE_ZSTD_INCLUDE=$DEPS/usr/include)
  [[ -e /usr/include/CLI/App.hpp ]] || cxx_flags="-isystem $DEPS/cli11"
  export LD_LIBRARY_PATH=$L/openblas-openmp:$L:${LD_LIBRARY_PATH:-}
else
  echo "no .gpudeps/deps.tar.xz: run 'bash scripts/gpu_check.sh --pack' here and carry .gpudeps"
fi

# Where the binaries end up: the whole project when it builds there (CLI included), else the GPU
# engine's part alone.
MOETRACE=""
CUDA_TESTS=$BUILD/cuda_tests
BACKEND_TESTS=$BUILD/backend_tests
BENCH_GPU=$BUILD/bench_gpu
BENCH_LM=$BUILD/bench_lm_gpu
BENCH_LIBS=$BUILD/bench_libs
if has build; then
  t0=$(date +%s)
  mkdir -p $BUILD
  # Arrow C++ from the image's pyarrow wheel (the same way scripts/setup.sh gets it here).
  python3 -c 'import pyarrow; pyarrow.create_library_symlinks()' 2>/dev/null
  if cmake -S $ROOT -B $BUILD/full -G Ninja -DCMAKE_BUILD_TYPE=Release -DMOETRACE_WERROR=OFF -DMOETRACE_CUDA=ON \
      -DMOETRACE_PYTHON="$(command -v python3)" -DCMAKE_CXX_FLAGS="$cxx_flags" "${cmake_args[@]}" \
      >"$BUILD/full-configure.log" 2>&1 &&
    cmake --build $BUILD/full -j "$NPROC" --target ${GPU_TARGETS:-moetrace cuda_tests backend_tests engine_tests bench_gpu bench_lm_gpu bench_store bench_libs} >"$BUILD/full-build.log" 2>&1; then
    MOETRACE=$BUILD/full/tools/cli/moetrace
    CUDA_TESTS=$BUILD/full/tests/cuda_tests
    BACKEND_TESTS=$BUILD/full/tests/backend_tests
    BENCH_GPU=$BUILD/full/bench/bench_gpu
    BENCH_LM=$BUILD/full/bench/bench_lm_gpu
    BENCH_LIBS=$BUILD/full/bench/bench_libs
    echo "== full build (CLI included): $(( $(date +%s) - t0 )) s"
  else
    echo "== full project build failed; building the GPU engine's part alone. Last lines:"
    tail -25 "$BUILD/full-configure.log" "$BUILD/full-build.log" 2>/dev/null | grep -v "^\[" | tail -25
  fi
fi
[[ -x $BUILD/full/tools/cli/moetrace ]] && MOETRACE=$BUILD/full/tools/cli/moetrace CUDA_TESTS=$BUILD/full/tests/cuda_tests \
  BACKEND_TESTS=$BUILD/full/tests/backend_tests BENCH_GPU=$BUILD/full/bench/bench_gpu BENCH_LM=$BUILD/full/bench/bench_lm_gpu \
  BENCH_LIBS=$BUILD/full/bench/bench_libs

# BASELINE_SRC=DIR (a source tree of an earlier commit, e.g. `git archive REV src include tools cmake
# assets bench scripts python CMakeLists.txt CMakePresets.json`): its CLI is built too, with the same
# flags, and the `scale` step runs its one-GPU job with it first, so that every end-to-end number has
# its baseline from the same call.
if has build && [[ -n ${BASELINE_SRC:-} && -n $MOETRACE ]]; then
  if cmake -S "$BASELINE_SRC" -B $BUILD/base -G Ninja -DCMAKE_BUILD_TYPE=Release -DMOETRACE_WERROR=OFF \
      -DMOETRACE_CUDA=ON -DMOETRACE_TESTS=OFF -DMOETRACE_BENCH=OFF -DMOETRACE_PYTHON="$(command -v python3)" \
      -DCMAKE_CXX_FLAGS="$cxx_flags" "${cmake_args[@]}" >"$BUILD/base-configure.log" 2>&1 &&
    cmake --build $BUILD/base -j "$NPROC" --target moetrace >"$BUILD/base-build.log" 2>&1; then
    BASE_MOETRACE=$BUILD/base/tools/cli/moetrace
    echo "== baseline CLI built from $BASELINE_SRC"
  else
    echo "== baseline build failed:"; tail -15 "$BUILD/base-build.log" "$BUILD/base-configure.log" 2>/dev/null | tail -15
  fi
fi
if has build && [[ -z $MOETRACE ]]; then
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
file(GLOB backend_test_srcs $ROOT/tests/backend/*_test.cc)
add_executable(backend_tests \${backend_test_srcs})
target_include_directories(backend_tests PRIVATE $ROOT/tests)
target_compile_definitions(backend_tests PRIVATE MOETRACE_BACKEND_CUDA)
target_link_libraries(backend_tests PRIVATE moetrace_kernels_cpu moetrace_cuda GTest::gtest_main)
file(GLOB bench_gpu_srcs $ROOT/bench/bench_gpu*.cc)
if(bench_gpu_srcs AND TARGET moetrace_model_cuda)
  add_executable(bench_gpu \${bench_gpu_srcs})
  target_link_libraries(bench_gpu PRIVATE moetrace_all)
endif()
if(EXISTS $ROOT/bench/bench_lm_gpu.cc AND TARGET moetrace_model_cuda)
  add_executable(bench_lm_gpu $ROOT/bench/bench_lm_gpu.cc)
  target_link_libraries(bench_lm_gpu PRIVATE moetrace_all)
endif()
if(EXISTS $ROOT/bench/bench_libs.cu AND TARGET moetrace_cuda)
  add_executable(bench_libs $ROOT/bench/bench_libs.cu)
  target_compile_options(bench_libs PRIVATE \$<\$<COMPILE_LANGUAGE:CUDA>:\${MOETRACE_CUDA_FLAGS}>)
  target_link_libraries(bench_libs PRIVATE moetrace_cuda CUDA::cublas CUDA::cublasLt)
endif()
CMAKE
  t0=$(date +%s)
  set -o pipefail
  cmake -S $BUILD/src -B $BUILD -G Ninja -DCMAKE_BUILD_TYPE=Release "${cmake_args[@]}" 2>&1 | tee "$BUILD/configure.log" | tail -15 || exit 1
  targets=(cuda_tests backend_tests)
  grep -q '^build bench_gpu' $BUILD/build.ninja 2>/dev/null && targets+=(bench_gpu)
  grep -q '^build bench_lm_gpu' $BUILD/build.ninja 2>/dev/null && targets+=(bench_lm_gpu)
  grep -q '^build bench_libs' $BUILD/build.ninja 2>/dev/null && targets+=(bench_libs)
  cmake --build $BUILD -j "$NPROC" --target "${targets[@]}" 2>&1 | tee "$BUILD/build.log" | grep -E "error|warning: |FAILED" | head -40
  [[ ${PIPESTATUS[0]} -eq 0 ]] || { echo "BUILD FAILED"; tail -30 "$BUILD/build.log"; exit 1; }
  echo "== build: $(( $(date +%s) - t0 )) s"
fi

if has test; then
  # Each binary under a time limit: a hang (e.g. a pipeline slot never released) fails the step
  # instead of eating the device call.
  timeout 300 $CUDA_TESTS --gtest_output=xml:"$OUT/cuda_tests.xml" 2>&1 | tee "$OUT/tests.log" | grep -E "^\[  (FAILED|PASSED|SKIPPED) |Failure|error|Expected|Which is|rel|^\[==" | head -80
  # The backend test: every op of kernels/cuda against its CPU twin in kernels/cpu, f32/bf16/f16.
  timeout 300 $BACKEND_TESTS --gtest_output=xml:"$OUT/backend_tests.xml" 2>&1 | tee "$OUT/backend.log" | grep -E "^\[  (FAILED|PASSED|SKIPPED) |Failure|Expected|Which is|^\[==" | head -80
  # The Engine interface on the GPU against the CPU engine (collect's pipeline, with generation).
  if [[ -x $BUILD/full/tests/engine_tests ]]; then
    timeout 300 $BUILD/full/tests/engine_tests --gtest_output=xml:"$OUT/engine_tests.xml" 2>&1 | tee "$OUT/engine_tests.log" |
      grep -E "^\[  (FAILED|PASSED|SKIPPED) |Failure|Expected|Which is|^\[==" | head -40
  fi
fi

# Every fixture through `moetrace forward --device cuda` (encoder, teacher-forced decoder, greedy
# generation of the reference's length; the MoE language models' prefill and generation), compared
# with its transformers reference by the script the CPU test uses (tests/python/test_forward_device.py):
# fp32 within the CPU parity bounds (1e-4 relative, top1/kept/ids identical); the other precisions
# reported with looser bounds and their top-1 (top-k ids) agreement. FORWARD_DEVICE=cpu runs the
# same loop on the CPU engine (a check of this script without a GPU).
#   forward_fixture_set LABEL PRECISIONS FIXTURE...   each fixture: DIR:INPUTS:STEPS
forward_fixture_set() {
  local label=$1 precs=$2 spec fx inputs steps name out prec rc=0
  shift 2
  for spec in "$@"; do
    IFS=: read -r fx inputs steps <<<"$spec"
    name=${label:+$label }$(basename "$fx")
    for prec in $precs; do
      out=/tmp/moetrace-forward-${label:+$label-}$(basename "$fx")-$prec.safetensors
      if ! $MOETRACE forward --device "${FORWARD_DEVICE:-cuda}" --precision $prec -m "$fx/model" --inputs "$inputs" \
          -o "$out" --generate "$steps" -q; then
        echo "forward $name $prec: FAILED"; rc=1; continue
      fi
      if [[ $prec == fp32 ]]; then
        python3 "$ROOT/scripts/compare_forward.py" "$out" "$fx/reference.safetensors" --label "$name $prec" || rc=1
      else
        python3 "$ROOT/scripts/compare_forward.py" "$out" "$fx/reference.safetensors" --rtol 5e-2 --min-agreement 0 \
          --label "$name $prec" | tail -1
      fi
    done
  done
  return $rc
}
# The Switch fixtures (tests/data/fixtures: generation as long as the reference's) and the language
# models' (tests/data/fixtures_lm: meta.json's generate_new_tokens), as DIR:INPUTS:STEPS.
switch_fixtures() {
  local fx ref
  for fx in "$ROOT"/tests/data/fixtures/*; do
    ref=$fx/reference.safetensors
    [[ -e $ref ]] || continue
    echo "$fx:$ref:$(python3 -c 'import json,struct,sys; f=open(sys.argv[1],"rb"); n=struct.unpack("<Q",f.read(8))[0]; print(json.loads(f.read(n))["generated_ids"]["shape"][1]-1)' "$ref")"
  done
}
lm_fixtures() {
  local fx
  for fx in "$ROOT"/tests/data/fixtures_lm/*; do
    [[ -e $fx/reference.safetensors ]] || continue
    echo "$fx:$fx/inputs.safetensors:$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["generate_new_tokens"])' "$fx/meta.json")"
  done
}
if has forward && [[ -x $MOETRACE ]]; then
  # shellcheck disable=SC2046  # one word per fixture
  forward_fixture_set "" "fp32 bf16 faithful" $(switch_fixtures) 2>&1 | tee "$OUT/forward.txt" | grep -E "FAIL|within bounds"
  # shellcheck disable=SC2046
  forward_fixture_set lm "fp32 bf16" $(lm_fixtures) 2>&1 | tee "$OUT/forward_lm.txt" | grep -E "FAIL|within bounds"
fi

# Issue 18's measurement: bench/fidelity.py (a transformers-initialized switch-base-128-shaped
# encoder, 600 real samples, every precision's agreement with fp32 and with transformers), then
# bench/rounding_points.py --variants points on its fp32 store (which rounding point costs mixed).
if has fidelity && [[ -x $MOETRACE ]]; then
  PYTHONUNBUFFERED=1 timeout 420 python3 "$ROOT/bench/fidelity.py" --device cuda --experts 128 --layers 12 --d-model 768 \
    --samples 600 --cli "$MOETRACE" --work /tmp/moetrace_fidelity --json "$OUT/fidelity.json" ${FIDELITY_ARGS:-} 2>&1 | tee "$OUT/fidelity.log" | tail -32
  if [[ -d /tmp/moetrace_fidelity ]]; then
    # On fidelity.py's own weights (--model): the emulation's agreement beside the engine's, then
    # each rounding point's share of what `mixed` loses.
    st=$(ls -d /tmp/moetrace_fidelity/*fp32* 2>/dev/null | head -1)
    for v in ${ROUNDING_VARIANTS:-all points h}; do
      [[ -n $st ]] && PYTHONUNBUFFERED=1 timeout 200 python3 "$ROOT/bench/rounding_points.py" "$st" --variants $v \
        --model /tmp/moetrace_fidelity/model --out "$OUT/rounding_$v.json" 2>&1 | tee "$OUT/rounding_$v.log" | tail -14
    done
  fi
  # More weight draws (FIDELITY_SEEDS="1 2"): mixed's agreement differs by draw (0.17 points between
  # the CUDA-initialized seed 0 and three CPU-initialized draws, docs/PERFORMANCE.md 2026-12-08).
  for seed in ${FIDELITY_SEEDS:-}; do
    PYTHONUNBUFFERED=1 timeout 420 python3 "$ROOT/bench/fidelity.py" --device cuda --experts 128 --layers 12 \
      --d-model 768 --samples 600 --seed "$seed" --precisions fp32,bf16,mixed,faithful --cli "$MOETRACE" \
      --work /tmp/moetrace_fidelity_s$seed --json "$OUT/fidelity_seed$seed.json" 2>&1 |
      tee "$OUT/fidelity_seed$seed.log" | grep -E "vs moetrace fp32|tokens/s" | head -12
    rm -rf /tmp/moetrace_fidelity_s$seed
  done
fi

# The baselines beside every GPU table (docs/GPU.md "Baselines"): the strong PyTorch Switch encoder,
# the LM prefill baselines (transformers with output_router_logits and a strong PyTorch), and
# transformers' generate against bench_gpu --generate.
if has baselines; then
  [[ -e /tmp/moetrace_mix.txt ]] || python3 "$ROOT/bench/hf_switch_bench.py" --write-mix
  PYTHONUNBUFFERED=1 timeout 300 python3 "$ROOT/bench/torch_switch_baseline.py" --device cuda --repeats 5 \
    --json "$OUT/torch_switch_baseline.json" 2>&1 | tee "$OUT/torch_switch_baseline.log" | tail -16
  PYTHONUNBUFFERED=1 timeout 400 python3 "$ROOT/bench/lm_baselines.py" --device cuda --repeats 3 \
    --json "$OUT/lm_baselines.json" ${LM_BASELINE_ARGS:-} 2>&1 | tee "$OUT/lm_baselines.log" | tail -20
  gen=(); [[ -x $BENCH_GPU ]] && gen=(--bench-gpu "$BENCH_GPU")
  PYTHONUNBUFFERED=1 timeout 300 python3 "$ROOT/bench/hf_generate_bench.py" --device cuda --new-tokens 32 \
    "${gen[@]}" --json "$OUT/hf_generate.json" 2>&1 | tee "$OUT/hf_generate.log" | tail -16
fi

# Issue 18's speed side: bench_gpu in each GPU precision one after the other on the same card,
# bf16 first and last (the spread of the two bf16 runs is the noise), JSON per run.
if has precisions && [[ -x $BENCH_GPU ]]; then
  [[ -e /tmp/moetrace_mix.txt ]] || python3 $ROOT/bench/hf_switch_bench.py --write-mix
  for p in bf16 mixed faithful bf16; do
    n=$p; [[ -e $OUT/bench_$p.json ]] && n=${p}_again
    $BENCH_GPU --precision $p --shapes ${PRECISION_SHAPES:-128x256,mix,mix-collect} --json "$OUT/bench_$n.json" 2>&1 |
      tee "$OUT/bench_$n.log" | grep -E "^(128x|mix)" | sed "s/^/$n  /"
  done
fi

if has bench && [[ -x $BENCH_GPU ]]; then
  [[ -e /tmp/moetrace_mix.txt ]] || python3 $ROOT/bench/hf_switch_bench.py --write-mix
  $BENCH_GPU --json "$OUT/bench_gpu.json" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log" | tail -40
fi

# The MoE language models (issue 20): their GPU tests (fixtures in fp32 against transformers and
# the CPU engine, bf16 agreement, reproducibility), their ops in the backend test, and the prefill
# benchmark at the OLMoE-1B-7B and Mixtral-8x7B shapes (a model larger than the GPU is measured with
# the layers that fit, and says so).
if has lm; then
  if ! has test; then  # the test step runs every test binary, these included
    timeout 300 $CUDA_TESTS --gtest_filter='*Lm*' --gtest_output=xml:"$OUT/lm_tests.xml" 2>&1 | tee "$OUT/lm_tests.log" |
      grep -E "^\[  (FAILED|PASSED|SKIPPED) |Failure|Expected|Which is|^\[ (fp32|BF16|F16) \]|^\[==" | head -120
    timeout 300 $BACKEND_TESTS --gtest_filter='*lm_*:*moe_*:*swiglu*:*fill_uniform*:*gemm*' 2>&1 | tee "$OUT/lm_backend.log" |
      grep -E "^\[  (FAILED|PASSED|SKIPPED) |Failure|Expected|Which is|^\[==" | head -60
  fi
  # collect on a language model end to end through the GPU engine: tests/python/test_collect_lm.py
  # with MOETRACE_TEST_DEVICE=cuda (collect and forward in fp32 on the GPU), then the same model in
  # the default precision with its audit.
  if [[ -n $MOETRACE ]]; then
    echo "== collect on a language model, --device cuda (tests/python/test_collect_lm.py)"
    MOETRACE_TEST_DEVICE=cuda MOETRACE_CLI=$MOETRACE timeout 300 python3 -m pytest -q -p no:cacheprovider \
      "$ROOT/tests/python/test_collect_lm.py" 2>&1 | tee "$OUT/lm_collect_tests.log" | tail -4
    L=/tmp/moetrace-lm-collect && rm -rf $L && mkdir -p $L
    PYTHONPATH=$ROOT/tests/python:$ROOT/python python3 -c "from test_collect_lm import make_model; make_model('$L/model')" &&
      $MOETRACE collect --model $L/model --device cuda --traces 400 --datasets ag_news --data-root "$ROOT/tests/data" \
        --decoder --max-new-tokens 8 --audit 0.5 --no-progress -o $L/store 2>&1 | tee "$OUT/lm_collect_bf16.log" |
        grep -E "timing|error|audit|fidelity" | tail -4
    [[ -d $L/store ]] && $MOETRACE verify $L/store 2>&1 | tail -1 && $MOETRACE inspect $L/store 2>&1 | grep -iE -A4 "fidelity" | head -8
  fi
  if [[ -x $BENCH_LM ]]; then
    timeout 480 $BENCH_LM --json "$OUT/bench_lm_gpu.json" ${LM_BENCH_ARGS:-} 2>&1 | tee "$OUT/bench_lm.log" | tail -30
  else
    echo "no bench_lm_gpu binary at $BENCH_LM"
  fi
fi

if has hf && [[ -e $ROOT/bench/hf_switch_bench.py ]]; then
  PYTHONUNBUFFERED=1 python3 $ROOT/bench/hf_switch_bench.py --json "$OUT/hf_bench.json" ${HF_ARGS:-} 2>&1 | tee "$OUT/hf.log" | tail -25
fi

if has ncu && [[ -x $BENCH_GPU ]]; then
  # Kernel durations of one 128x256 batch (bench_gpu --ncu brackets it with cudaProfilerStart/Stop).
  ncu --clock-control none --profile-from-start off --metrics gpu__time_duration.sum --csv \
    $BENCH_GPU --ncu >"$BUILD/ncu.csv" 2>"$BUILD/ncu.err"
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

# The seed's job through the CLI: random switch-base-128 (bf16) on real rows (the demo datasets with
# their quotas raised, from assets/demo/data and tests/data), 10,000 traces into a store, verified;
# then the CLI's GPU path against its CPU path on the demo model (fp32: experts must agree but for
# near-ties), encoder and, when the GPU has it, the decoder.
if has collect && [[ -x $MOETRACE ]]; then
  S=/tmp/moetrace-collect && rm -rf $S && mkdir -p $S
  python3 - "$ROOT/assets/catalog/datasets.json" >$S/catalog.json <<'PY'
import json, sys
c = json.load(open(sys.argv[1]))
entries = c["datasets"] if isinstance(c, dict) else c
print(json.dumps({"version": 1, "datasets": [dict(e, quota=100000) for e in entries if "demo" in e.get("groups", [])]}))
PY
  data=(--datasets demo --catalog $S/catalog.json --data-root $ROOT/assets/demo/data --data-root $ROOT/tests/data)
  echo "== seed job: moetrace collect --device cuda --model random:switch-base-128 --traces 10000"
  $MOETRACE collect --device cuda --model random:switch-base-128 --traces 10000 "${data[@]}" --no-progress \
    --output $S/seed 2>&1 | tee "$OUT/collect_seed.log" | grep -E "timing|samples,|error|GPU in" | tail -5
  $MOETRACE verify $S/seed 2>&1 | tail -2 | tee -a "$OUT/collect_seed.log"
  echo "== batching windows on real text: 60000 traces with collect's default window (4096 samples on"
  echo "   cuda) and with --batch-window 1024 (one shard: the window before), same call"
  for w in 0 1024; do
    $MOETRACE collect --device cuda --model random:switch-base-128 --traces 60000 "${data[@]}" --no-progress \
      --batch-window $w --output $S/window-$w 2>&1 | tee "$OUT/collect_window_$w.log" |
      grep -E "batching windows|timing|error" | tail -2
    rm -rf $S/window-$w
  done
  echo "== the same with --hidden bf16 (the router inputs too)"
  $MOETRACE collect --device cuda --model random:switch-base-128 --traces 10000 "${data[@]}" --no-progress \
    --hidden bf16 --output $S/seed-hidden 2>&1 | tee "$OUT/collect_seed_hidden.log" | grep -E "timing|error" | tail -2
  $MOETRACE verify $S/seed-hidden 2>&1 | tail -1 | tee -a "$OUT/collect_seed_hidden.log"
  rm -rf $S/seed-hidden
  echo "== no --device (auto, the default) on the GPU; --resume -t 6000 extends a 3000-trace store to the"
  echo "   store of a clean 6000-trace run; a complete store resumes as a no-op"
  auto=(--model random:switch-base-128 "${data[@]}" --no-progress)
  $MOETRACE collect "${auto[@]}" --traces 3000 --output $S/auto 2>&1 | tee "$OUT/collect_auto.log" |
    grep -E "model loaded|error|Output" | tail -3
  python3 -c "import json,sys; m=json.load(open(sys.argv[1])); print('manifest device:', m.get('device'), '| engine:', json.dumps(m.get('engine')))" \
    $S/auto/manifest.json | tee -a "$OUT/collect_auto.log"
  $MOETRACE collect "${auto[@]}" --traces 6000 --output $S/auto --resume 2>&1 | tee -a "$OUT/collect_auto.log" |
    grep -E "error|Output" | tail -2
  $MOETRACE collect "${auto[@]}" --traces 6000 --output $S/auto-clean 2>&1 | grep -E "error" | tail -2
  $MOETRACE collect "${auto[@]}" --traces 6000 --output $S/auto --resume 2>&1 | tee -a "$OUT/collect_auto.log" |
    grep -E "error|complete|Output" | tail -2
  $MOETRACE verify $S/auto 2>&1 | tail -1 | tee -a "$OUT/collect_auto.log"
  python3 - $S/auto $S/auto-clean <<'PY' 2>&1 | tee -a "$OUT/collect_auto.log"
import hashlib, json, sys
def digests(d):
    m = json.load(open(d + "/manifest.json"))
    return [hashlib.sha256(open(d + "/" + s["file"], "rb").read()).hexdigest() for s in m["shards"]]
a, b = digests(sys.argv[1]), digests(sys.argv[2])
print(f"extended store vs clean run: {len(a)} / {len(b)} shards, identical: {a == b}")
PY
  rm -rf $S/auto $S/auto-clean
  for dev in cpu cuda; do
    $MOETRACE collect --device $dev --precision fp32 --model demo --traces 3000 "${data[@]}" --no-progress \
      --logits f32 --hidden f32 --output $S/demo-$dev >$S/demo-$dev.log 2>&1 || { echo "demo $dev failed:"; tail -3 $S/demo-$dev.log; }
    $MOETRACE collect --device $dev --precision fp32 --model demo --traces 600 "${data[@]}" --no-progress \
      --logits f32 --decoder --max-new-tokens 16 --output $S/dec-$dev >$S/dec-$dev.log 2>&1 ||
      { echo "decoder $dev failed:"; tail -3 $S/dec-$dev.log; }
  done
  PYTHONPATH=$ROOT/python python3 - $S <<'PY' 2>&1 | tee "$OUT/collect_parity.txt"
import sys, numpy as np, moetrace
S = sys.argv[1]
for kind in ("demo", "dec"):
    try:
        a, b = moetrace.open_store(f"{S}/{kind}-cpu"), moetrace.open_store(f"{S}/{kind}-cuda")
    except Exception as e:
        print(f"{kind}: not comparable ({e})"); continue
    n = min(len(a), len(b)); same = tot = 0; worst = hidden_worst = 0.0; ids_same = 0
    for i in range(n):
        sa, sb = a[i], b[i]
        for name in sa.layers:
            la = np.asarray(sa.layer(name).router_logits, np.float64)
            lb = np.asarray(sb.layer(name).router_logits, np.float64)
            if la.shape != lb.shape or la.size == 0: continue
            worst = max(worst, float(np.abs(la - lb).max() / max(np.abs(la).max(), 1e-30)))
            same += int((la.argmax(-1) == lb.argmax(-1)).sum()); tot += la.shape[0]
            ha, hb = sa.layer(name).hidden, sb.layer(name).hidden
            if ha is not None and hb is not None and ha.size:
                ha, hb = np.asarray(ha, np.float64), np.asarray(hb, np.float64)
                hidden_worst = max(hidden_worst, float(np.abs(ha - hb).max() / max(np.abs(ha).max(), 1e-30)))
        if kind == "dec":
            ids_same += int(np.array_equal(sa.dec_output_ids, sb.dec_output_ids))
    extra = f", generated ids identical for {ids_same}/{n} samples" if kind == "dec" else f", max rel hidden diff {hidden_worst:.2e}"
    print(f"{kind}: {n} samples, top-1 agreement {same}/{tot} ({100*same/max(tot,1):.3f}%), max rel logit diff {worst:.2e}{extra}")
PY
fi

# Data-parallel scaling (issue #9): the same job on one GPU, then one rank per GPU; throughput is
# tokens over the collection loop (after model load), the ranks' tokens over the slowest loop.
if has scale && [[ -x $MOETRACE ]]; then
  NG=$(nvidia-smi -L | wc -l)
  N=${SCALE_SAMPLES:-40960}
  D=/tmp/moetrace-scale && rm -rf $D && mkdir -p $D/data/local/wikitext-windows
  SD=${SCALE_STORE:-/dev/shm/moetrace-scale} && rm -rf $SD
  python3 - "$ROOT/tests/data/wikitext2_tokens" $N $D <<'PY'
import json, random, sys, pathlib
src, n, d = pathlib.Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
text = " ".join(l.strip() for f in ("valid.txt", "test.txt") if (src / f).exists()
                for l in open(src / f) if l.strip() and not l.strip().startswith("="))
rng = random.Random(0)
with open(f"{d}/data/local/wikitext-windows/train.jsonl", "w") as out:
    for _ in range(n):
        s = rng.randrange(0, len(text) - 1200)
        out.write(json.dumps({"text": text[s:s + 1100]}) + "\n")
json.dump({"version": 1, "datasets": [{"name": "bench/wikitext-windows", "hub": "local/wikitext-windows",
           "split": "train", "category": "bench", "quota": n, "template": "{text}"}]}, open(f"{d}/catalog.json", "w"))
PY
  common=(collect --device cuda --model random:switch-base-128 --datasets bench/wikitext-windows
    --catalog $D/catalog.json --data-root $D/data --traces $((6 * N)) --max-length 256 --no-progress)
  [[ -x $BUILD/full/bench/bench_store ]] && $BUILD/full/bench/bench_store --samples 12288 --dir $SD-bench \
    --json $OUT/bench_store.json 2>&1 | tail -3
  if [[ -n ${BASE_MOETRACE:-} ]]; then
    echo "== baseline CLI, the same one-GPU job"
    CUDA_VISIBLE_DEVICES=0 $BASE_MOETRACE "${common[@]}" --output $SD/base >$OUT/scale_base.log 2>&1 || tail -5 $OUT/scale_base.log
    grep -E "timing:" $OUT/scale_base.log | tail -1
    rm -rf $SD/base
  fi
  echo "== scaling: $N samples of ~256 tokens, 1 GPU, then $NG ranks (store in $SD)"
  t0=$(date +%s.%N)
  CUDA_VISIBLE_DEVICES=0 $MOETRACE "${common[@]}" --output $SD/one >$OUT/scale_1.log 2>&1 || tail -5 $OUT/scale_1.log
  t1=$(date +%s.%N)
  rm -rf $SD/one
  for ((r = 0; r < NG; r++)); do
    $MOETRACE "${common[@]}" --rank $r --world-size $NG --local-rank $r --output $SD/multi >$OUT/scale_rank$r.log 2>&1 &
  done
  wait
  t2=$(date +%s.%N)
  $MOETRACE merge $SD/multi 2>&1 | tail -2
  $MOETRACE verify $SD/multi 2>&1 | tail -1
  python3 - $OUT $NG $t0 $t1 $t2 <<'PY' | tee "$OUT/scale_summary.txt"
import re, sys, glob, json
out, ng, t0, t1, t2 = sys.argv[1], int(sys.argv[2]), *map(float, sys.argv[3:6])
def timing(f):
    m = re.search(r"timing: total ([\d.e+-]+) s, loop ([\d.e+-]+) s, engine ([\d.e+-]+) s, (\d+) tokens", open(f).read())
    return dict(total=float(m[1]), loop=float(m[2]), tokens=int(m[4])) if m else None
base = timing(f"{out}/scale_base.log") if glob.glob(f"{out}/scale_base.log") else None
if base:
    print(f"baseline 1 GPU: {base['tokens']} tokens, loop {base['loop']:.2f} s -> {base['tokens']/base['loop']/1e6:.3f} M tokens/s")
one = timing(f"{out}/scale_1.log"); ranks = [timing(f"{out}/scale_rank{r}.log") for r in range(ng)]
if one is None or None in ranks:
    print("scaling: a run did not finish (see scale_*.log)"); sys.exit()
tp1 = one["tokens"] / one["loop"]; tpn = sum(r["tokens"] for r in ranks) / max(r["loop"] for r in ranks)
print(f"1 GPU : {one['tokens']} tokens, loop {one['loop']:.2f} s -> {tp1/1e6:.3f} M tokens/s (wall {t1-t0:.1f} s incl. load)")
print(f"{ng} GPUs: {sum(r['tokens'] for r in ranks)} tokens, slowest loop {max(r['loop'] for r in ranks):.2f} s -> {tpn/1e6:.3f} M tokens/s (wall {t2-t1:.1f} s incl. load)")
print(f"speed-up {tpn/tp1:.2f}x on {ng} GPUs")
json.dump(dict(baseline=base, one=one, ranks=ranks, speedup=tpn / tp1, gpus=ng), open(f"{out}/scale.json", "w"), indent=1)
PY
  rm -rf $SD
fi

# Libraries against the hand kernels (docs/GPU.md): bench_libs (grouped expert GEMM against cuBLAS
# grouped / a cuBLASLt loop, flash attention, the dense GEMMs' algorithm choice), then PyTorch's
# SDPA backends (cuDNN, ...) on the same attention shape; the two tables come last (this step is the
# script's last).
if has libs && [[ -x $BENCH_LIBS ]]; then
  timeout 150 $BENCH_LIBS --json "$OUT/bench_libs.json" ${LIBS_ARGS:-} >"$OUT/bench_libs.log" 2>&1
  rc=$?
  [[ $rc -eq 0 ]] || { echo "bench_libs exit $rc (2: an implementation disagrees, 3: a part failed):"; grep -E "ERROR|failed|bench_libs:" "$OUT/bench_libs.log" | tail -5; }
  moetrace_json=()
  [[ -s $OUT/bench_libs.json ]] && moetrace_json=(--moetrace "$OUT/bench_libs.json")
  PYTHONUNBUFFERED=1 timeout 150 python3 "$ROOT/bench/attention_libs.py" --json "$OUT/attention_libs.json" \
    "${moetrace_json[@]}" >"$OUT/attention_libs.log" 2>&1 || echo "attention_libs.py exit $?"
  sed -n '/^== /,$p' "$OUT/bench_libs.log"
  sed -n '/^== /,$p' "$OUT/attention_libs.log" | grep -q . && sed -n '/^== /,$p' "$OUT/attention_libs.log" ||
    tail -15 "$OUT/attention_libs.log"
fi
