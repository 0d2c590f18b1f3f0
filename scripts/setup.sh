#!/usr/bin/env bash
# Sets up an environment for fusedres and builds it; prints the python to use on its last line.
# Never replaces a torch that already imports (a GPU user's CUDA build): torch is installed only
# when none imports, and then as torch==2.13.0 into a fresh ./.venv.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  if [ -z "${VIRTUAL_ENV:-}" ]; then
    [ -x .venv/bin/python ] || "$PY" -m venv .venv
    PY="$PWD/.venv/bin/python"
  fi
  if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    "$PY" -m pip install -q --upgrade pip >&2
    "$PY" -m pip install -q torch==2.13.0 >&2
  fi
fi
# Build and test tools; triton only when none imports (CUDA torch wheels bring their own).
"$PY" -m pip install -q setuptools wheel ninja packaging numpy pytest >&2
# Property tests; optional (offline machines draw seeded random examples instead).
"$PY" -c "import hypothesis" >/dev/null 2>&1 || "$PY" -m pip install -q hypothesis >&2 \
  || echo "setup: hypothesis not installed; the property tests draw seeded random examples" >&2
"$PY" -c "import triton" >/dev/null 2>&1 || "$PY" -m pip install -q triton >&2
# Plots of the benchmark report; optional (offline machines run the report without them).
"$PY" -c "import matplotlib" >/dev/null 2>&1 || "$PY" -m pip install -q matplotlib >&2 \
  || echo "setup: matplotlib not installed; the benchmark report will skip its plots" >&2
"$PY" -m pip install -v --no-build-isolation --no-deps . 2>&1 | grep -E "fusedres build|error|Error" >&2 || true
PYTHONSAFEPATH=1 "$PY" -c "import fusedres, sys; sys.exit(0 if fusedres.extension_loaded() else 'fusedres._C failed to build')" >&2
echo "$PY"
