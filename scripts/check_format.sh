#!/usr/bin/env bash
# Fails when any C++/CUDA source differs from .clang-format. Run with --fix to rewrite in place.
set -euo pipefail
cd "$(dirname "$0")/.."
files=$(git ls-files '*.h' '*.cc' '*.cu' '*.cuh' | grep -v '^tests/data/' || true)
[ -z "$files" ] && exit 0
if [ "${1:-}" = "--fix" ]; then
  echo "$files" | xargs clang-format -i
  exit 0
fi
bad=$(echo "$files" | xargs clang-format --dry-run 2>&1 | grep -o '^[^:]*:[0-9]*:[0-9]*: warning' | cut -d: -f1 | sort -u || true)
if [ -n "$bad" ]; then
  echo "check_format: these files are not clang-formatted (run scripts/check_format.sh --fix):"
  echo "$bad"
  exit 1
fi
echo "check_format: ok"
