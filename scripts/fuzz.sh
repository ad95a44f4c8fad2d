#!/usr/bin/env bash
# Builds the libFuzzer targets (CMake preset "fuzz", clang) and runs each for SECONDS (default 60) on
# seeds made from tests/data (fuzz/make_seeds.py) plus fuzz/corpus/<name>. New inputs go to
# build-fuzz/corpus/<name>; a crash leaves build-fuzz/artifacts/<name>/crash-* and fails the run.
# Usage: scripts/fuzz.sh [SECONDS] [TARGET...]     e.g. scripts/fuzz.sh 5 zip torch_checkpoint
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-60}
shift || true
all=(pickle safetensors_header safetensors_file zip torch_checkpoint config csv jsonl text parquet
     catalog trace_store)
if [ "$#" -gt 0 ]; then targets=("$@"); else targets=("${all[@]}"); fi

cmake --preset fuzz -DMOETRACE_PYTHON="$PWD/.venv/bin/python" >/dev/null
cmake --build --preset fuzz -j "$(nproc)" --target "${targets[@]/#/fuzz_}"

py=.venv/bin/python
[ -x "$py" ] || py=python3
"$py" fuzz/make_seeds.py build-fuzz/seeds

failed=()
for t in "${targets[@]}"; do
  corpus=build-fuzz/corpus/$t artifacts=build-fuzz/artifacts/$t
  mkdir -p "$corpus" "$artifacts"
  dirs=("$corpus")
  for d in "build-fuzz/seeds/$t" "fuzz/corpus/$t"; do
    [ -d "$d" ] && dirs+=("$d")
  done
  echo "== fuzz_$t: ${seconds}s"
  # -timeout: one input taking 10 s is a hang; -rss_limit_mb: 2 GB is a memory bomb.
  if ! ./build-fuzz/fuzz/fuzz_"$t" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 \
      -max_len=1048576 -print_final_stats=0 -artifact_prefix="$artifacts/" "${dirs[@]}" \
      >"build-fuzz/fuzz_$t.log" 2>&1; then
    tail -40 "build-fuzz/fuzz_$t.log"
    failed+=("$t")
  else
    grep -E "^#[0-9]+.*(DONE|pulse)" "build-fuzz/fuzz_$t.log" | tail -1 || true
  fi
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz: FAILED: ${failed[*]} (inputs in build-fuzz/artifacts/)" >&2
  exit 1
fi
echo "fuzz: all ${#targets[@]} targets ran ${seconds}s without a finding"
