#!/usr/bin/env bash
# The main job on a fresh machine: set-up, build, then `moetrace collect` with its defaults (the largest
# google/switch-base-* in the Hugging Face cache, else the built-in demo model on bundled real data),
# then `moetrace inspect` and `moetrace verify` of the store. Extra arguments go to collect.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/build.sh release
out=routing_data/traces
./build/tools/cli/moetrace collect --traces 3000 --output "$out" --overwrite "$@"
./build/tools/cli/moetrace inspect "$out"
./build/tools/cli/moetrace verify "$out"
