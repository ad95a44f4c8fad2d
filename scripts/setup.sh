#!/usr/bin/env bash
# Installs everything moetrace needs on a fresh Debian 12 machine. Idempotent: packages already
# present are not installed again, and the Python environment (.venv) is reused.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  build-essential cmake ninja-build pkg-config git clang clang-format clang-tidy libclang-rt-14-dev
  libgtest-dev libgmock-dev libbenchmark-dev
  libopenblas-openmp-dev nlohmann-json3-dev libcli11-dev libsentencepiece-dev libicu-dev
  zlib1g-dev libzstd-dev libssl-dev
  python3 python3-venv python3-pip
)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing Debian packages: ${missing[*]}"
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# Python: Arrow C++ (Debian has none) comes from the pyarrow wheel; numpy/pytest/matplotlib for the
# Python reader, its tests and the report plots; huggingface_hub for `moetrace fetch`.
PY=${MOETRACE_PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import numpy, pyarrow, pytest, matplotlib, pandas, scipy, tqdm, huggingface_hub, sentencepiece, datasets" 2>/dev/null; then
  echo "setup: installing Python packages into .venv"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -r scripts/requirements.txt
fi
# The moetrace Python package itself, editable (python/ changes apply at once), so that
# `.venv/bin/python -m moetrace ...` works from any directory.
if ! .venv/bin/python -c "import moetrace, os, sys; sys.exit(0 if os.path.samefile(os.path.dirname(moetrace.__file__), 'python/moetrace') else 1)" 2>/dev/null; then
  echo "setup: installing the moetrace Python package (editable) into .venv"
  .venv/bin/python -m pip install -q --no-deps -e python
fi
# libarrow.so / libparquet.so names for the linker (the wheel ships only versioned names).
.venv/bin/python -c "import pyarrow; pyarrow.create_library_symlinks()"
echo "setup: done"
