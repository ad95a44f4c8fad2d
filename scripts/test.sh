#!/usr/bin/env bash
# The whole test suite, from a fresh machine: set-up, format check, release build + tests, Python
# tests, the README's main job, and the AddressSanitizer + UBSan build + tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/check_format.sh
python3 scripts/check_layers.py
bash scripts/build.sh release
ctest --preset release -j "$(nproc)"
if [ -d tests/python ]; then
  .venv/bin/python -m pytest -q tests/python
fi
bash scripts/run_demo.sh
if [ "${MOETRACE_SKIP_ASAN:-0}" != "1" ]; then
  bash scripts/build.sh asan
  ctest --preset asan -j "$(nproc)"
fi
echo "moetrace: all tests passed"
