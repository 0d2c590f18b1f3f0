#!/usr/bin/env bash
# Sets up an environment for fusedres and builds it; prints the python to use on its last line.
#
#   scripts/setup.sh                the torch that already imports (a GPU user's CUDA build is never
#                                   replaced); only when none imports, torch==2.13.0 (CPU) in ./.venv
#   scripts/setup.sh --real-models  an environment where real torchvision and timm import, for
#                                   tests/test_real_models.py and the zoo sample: ./.venv-newest with
#                                   torch 2.15.0 (the newest supported; a CUDA 13.2 build, which runs
#                                   on the CPU too; pip's cap at 2.14.1 on these machines, a
#                                   constraint file, is lifted for this install only), torchvision
#                                   0.29.2 and timm 1.0.31 (pinned: the zoo sample lists its families),
#                                   created once and reused; fusedres is built there with its CUDA
#                                   kernels (sm_80, sm_90) whenever nvcc is present
#   scripts/setup.sh --oldest       the same for the oldest supported torch, the GPU machine's:
#                                   ./.venv-oldest with torch 2.11.0 (CUDA 13.0 build; triton 3.6
#                                   comes with it), torchvision 0.26.0, timm and numpy<2.4 (triton
#                                   3.6's interpreter fails with numpy 2.4, triton-lang/triton#9171);
#                                   CUDA kernels for sm_90 (the GPU machine's) whenever nvcc is present
#
# A failed build fails this script (and so both README commands), whatever build was installed before.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
ENV_KIND=default
case "${1:-}" in
  --real-models) ENV_KIND=newest ;;
  --oldest) ENV_KIND=oldest ;;
esac
NUMPY=numpy

pip_quiet() { "$1" -m pip install -q "${@:2}" >&2; }

if [ "$ENV_KIND" != default ]; then
  if [ "$ENV_KIND" = newest ]; then
    VENV=.venv-newest TORCH=2.15.0 TORCHVISION=0.29.2 ARCHS="8.0;9.0"
    # every install into this environment past pip's cap (a later `pip install timm` under the cap
    # would take torch back to 2.14.1 to satisfy it)
    export PIP_CONSTRAINT=/dev/null
  else
    VENV=.venv-oldest TORCH=2.11.0 TORCHVISION=0.26.0 ARCHS="9.0" NUMPY="numpy<2.4"
  fi
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  PY="$PWD/$VENV/bin/python"
  if ! "$PY" -c "import torch, torchvision, timm; assert torch.__version__.startswith('$TORCH') and timm.__version__ == '1.0.31'" >/dev/null 2>&1; then
    pip_quiet "$PY" --upgrade pip
    # pinned together: an unpinned torchvision would pull another torch
    pip_quiet "$PY" "torch==$TORCH" "torchvision==$TORCHVISION"
    pip_quiet "$PY" timm==1.0.31
  fi
  export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$ARCHS}"
elif ! "$PY" -c "import torch" >/dev/null 2>&1; then
  if [ -z "${VIRTUAL_ENV:-}" ]; then
    [ -x .venv/bin/python ] || "$PY" -m venv .venv
    PY="$PWD/.venv/bin/python"
  fi
  if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    pip_quiet "$PY" --upgrade pip
    pip_quiet "$PY" torch==2.13.0
  fi
fi
# Build and test tools; triton only when none imports (CUDA torch wheels bring their own).
pip_quiet "$PY" setuptools wheel ninja packaging "$NUMPY" pytest
# Parallel test workers; optional (without it the suite runs in one process).
"$PY" -c "import xdist" >/dev/null 2>&1 || pip_quiet "$PY" pytest-xdist \
  || echo "setup: pytest-xdist not installed; the tests run in one process" >&2
# Property tests; optional (offline machines draw seeded random examples instead).
"$PY" -c "import hypothesis" >/dev/null 2>&1 || pip_quiet "$PY" hypothesis \
  || echo "setup: hypothesis not installed; the property tests draw seeded random examples" >&2
"$PY" -c "import triton" >/dev/null 2>&1 || pip_quiet "$PY" triton
# Plots of the benchmark report; optional (offline machines run the report without them).
"$PY" -c "import matplotlib" >/dev/null 2>&1 || pip_quiet "$PY" matplotlib \
  || echo "setup: matplotlib not installed; the benchmark report will skip its plots" >&2
# ONNX Runtime, the CPU models suite's inference baseline; optional (without it that row says why).
# Installed only when it does not import; neither package depends on torch, so torch stays as it is.
"$PY" -c "import onnxruntime, onnx" >/dev/null 2>&1 || pip_quiet "$PY" onnxruntime onnx \
  || echo "setup: onnxruntime not installed; the CPU models suite will skip its ONNX Runtime rows" >&2

LOG="$(mktemp -t fusedres-build.XXXXXX)"
if ! "$PY" -m pip install -v --no-build-isolation --no-deps . >"$LOG" 2>&1; then
  grep -E "error|Error" "$LOG" | tail -n 40 >&2 || true
  echo "setup: building fusedres failed (full log: $LOG)" >&2
  exit 1
fi
grep -E "fusedres build:" "$LOG" | sort -u | sed 's/^ *//' >&2 || true
# The installed package must be this build: loaded, and with CUDA kernels where they were to be built.
PYTHONSAFEPATH=1 "$PY" - <<'EOF' >&2
import os, shutil, sys
import torch, fusedres
if not fusedres.extension_loaded():
    sys.exit(f"setup: {fusedres._extension.LOAD_ERROR}")
toolkit = shutil.which("nvcc") or os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")  # as setup.py decides
wanted = torch.version.cuda is not None and toolkit and os.environ.get("FUSEDRES_SKIP_CUDA_BUILD") != "1"
if wanted and not fusedres._extension.built_with_cuda():
    sys.exit("setup: torch has CUDA and nvcc is present, but fusedres._C was built without its CUDA kernels")
print(f"setup: fusedres._C loaded (torch {torch.__version__}, CUDA kernels: "
      f"{'yes' if fusedres._extension.built_with_cuda() else 'no'})")
EOF
echo "$PY"
