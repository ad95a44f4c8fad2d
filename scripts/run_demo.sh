#!/usr/bin/env bash
# The main job: set-up, build, then run moetrace on the bundled tiny model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/build.sh release
./build/tools/cli/moetrace inspect tests/data/fixtures/tiny-a/model
