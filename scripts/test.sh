#!/usr/bin/env bash
# README's test command: set up, build, run the tests in two stages.
#   stage 1  setup.sh's environment: the whole suite (CPU: Triton under the interpreter); extra
#            arguments go to this pytest
#   stage 2  the newest supported torch (2.15.0) with real torchvision / timm as the oracle
#            (tests/test_real_models.py), the zoo sweep's family sample (tests/test_zoo_sample.py)
#            and the extension built with its CUDA kernels (setup.sh --real-models); skipped when
#            stage 1's environment already has torchvision and timm (stage 1 then ran the
#            real-model tests itself; the zoo sample asks for FUSEDRES_ZOO_SAMPLE=1)
#   stage 3  the oldest supported torch (2.11.0, the GPU machine's, with triton 3.6; setup.sh
#            --oldest), torchvision and timm present: compile / export, fuse, modules, CPU paths,
#            errors, build and the real models (the numerics of the families beyond ResNet / DenseNet,
#            marked unit_families, are stage 2's); skipped when stage 1's torch is already 2.11
# FUSEDRES_TEST_STAGES=1, =2, =3 (or a list, "1,3") runs those stages only.
set -euo pipefail
cd "$(dirname "$0")/.."
STAGES="${FUSEDRES_TEST_STAGES:-1,2,3}"
# PYTHONSAFEPATH=1 keeps the working directory off sys.path, so the tests import the installed
# package (with fusedres._C), not ./fusedres, which has no compiled extension.
export PYTHONSAFEPATH=1
PY="$(bash scripts/setup.sh | tail -n 1)"
if [[ "$STAGES" == *1* ]]; then
  # The GPU machine's Triton (3.6), beside the installed one, for tests/test_sm90_compile.py: the
  # two compile the same kernels differently (3.6 spilled where 3.9 did not). Kernel code only, in
  # its own folder; the environment keeps its own Triton.
  GPU_TRITON=3.6.0
  if [ ! -f .triton-gpu/triton-$GPU_TRITON ]; then
    rm -rf .triton-gpu
    "$PY" -m pip install -q --no-deps --target .triton-gpu "triton==$GPU_TRITON"
    touch .triton-gpu/triton-$GPU_TRITON
  fi
  export FUSEDRES_GPU_TRITON="$PWD/.triton-gpu"
  echo "== stage 1: the suite ($("$PY" -c 'import torch; print("torch", torch.__version__)'))"
  # Without a GPU the suite is CPU-bound, mostly the single-threaded Triton interpreter: one worker
  # process per core (pytest-xdist, whole files per worker), each with one intra-op thread. With a
  # GPU, one process (workers would share the device).
  XDIST=()
  CORES="$(nproc)"
  if [ "$CORES" -gt 1 ] && "$PY" -c "import xdist, torch, sys; sys.exit(torch.cuda.is_available())" >/dev/null 2>&1; then
    XDIST=(-n "$(( CORES < 8 ? CORES : 8 ))" --dist loadfile)
  fi
  SECONDS=0
  (if [ ${#XDIST[@]} -gt 0 ]; then export OMP_NUM_THREADS=1; fi
   "$PY" -m pytest -q -p no:cacheprovider "${XDIST[@]}" "$@")
  echo "== stage 1 took $((SECONDS / 60)) min $((SECONDS % 60)) s"
fi
if [[ "$STAGES" == *2* ]]; then
  if "$PY" -c "import torchvision, timm" >/dev/null 2>&1 && [[ "$STAGES" == *1* ]]; then
    echo "== stage 2: skipped, stage 1's environment has torchvision and timm and ran the real-model tests"
    STAGES="${STAGES//2/}"
  fi
fi
if [[ "$STAGES" == *2* ]]; then
  SECONDS=0
  PY2="$(bash scripts/setup.sh --real-models | tail -n 1)"
  echo "== stage 2: the newest supported torch, real torchvision / timm models ($("$PY2" -c 'import torch, torchvision, timm; print("torch", torch.__version__, "torchvision", torchvision.__version__, "timm", timm.__version__)'); setup $((SECONDS / 60)) min $((SECONDS % 60)) s)"
  # two workers (--dist load: the real-model tests are one file), one intra-op thread each
  XDIST2=()
  if [ "$(nproc)" -gt 1 ] && "$PY2" -c "import xdist" >/dev/null 2>&1; then XDIST2=(-n 2 --dist load); fi
  OMP_NUM_THREADS=1 FUSEDRES_REAL_MODELS=1 "$PY2" -m pytest -q -p no:cacheprovider "${XDIST2[@]}" tests/test_real_models.py \
    tests/test_build.py::test_extension_is_loaded_and_has_cpu_kernels \
    tests/test_build.py::test_cuda_kernels_registered_when_built_with_cuda
  echo "== stage 2: real models took $((SECONDS / 60)) min $((SECONDS % 60)) s"
  # the zoo sweep's family sample: one process per model, two at a time (the sweep's own pool)
  OMP_NUM_THREADS=1 FUSEDRES_REAL_MODELS=1 FUSEDRES_ZOO_SAMPLE=1 "$PY2" -m pytest -q -p no:cacheprovider \
    tests/test_zoo_sample.py
  echo "== stage 2 took $((SECONDS / 60)) min $((SECONDS % 60)) s"
fi
if [[ "$STAGES" == *3* ]]; then
  if "$PY" -c "import sys, torch; sys.exit(not torch.__version__.startswith('2.11.'))" && [[ "$STAGES" == *1* ]]; then
    echo "== stage 3: skipped, stage 1 ran on torch 2.11, the oldest supported"
    exit 0
  fi
  SECONDS=0
  PY3="$(bash scripts/setup.sh --oldest | tail -n 1)"
  echo "== stage 3: the oldest supported torch ($("$PY3" -c 'import torch, torchvision, timm, triton, numpy; print("torch", torch.__version__, "triton", triton.__version__, "torchvision", torchvision.__version__, "timm", timm.__version__, "numpy", numpy.__version__)'); setup $((SECONDS / 60)) min $((SECONDS % 60)) s)"
  # Triton under the interpreter only where torch.compile traces it (tests/test_compile.py): the
  # rest of the interpreted cases check kernel semantics, which stage 1 covers (triton 3.9), and
  # would double this stage; triton 3.6's code generation is tests/test_sm90_compile.py's (stage 1).
  # --dist load: the real-model tests are one file, spread over both workers.
  XDIST3=()
  if [ "$(nproc)" -gt 1 ] && "$PY3" -c "import xdist" >/dev/null 2>&1; then XDIST3=(-n 2 --dist load); fi
  (export OMP_NUM_THREADS=1
   FUSEDRES_REAL_MODELS=1 "$PY3" -m pytest -q -p no:cacheprovider "${XDIST3[@]}" -m "not unit_families" \
     -k "test_compile.py or not triton-interpreted" tests/test_compile.py tests/test_fuse.py \
     tests/test_modules.py tests/test_cpu_paths.py tests/test_errors.py tests/test_build.py \
     tests/test_graph_units.py tests/test_real_models.py)
  echo "== stage 3 took $((SECONDS / 60)) min $((SECONDS % 60)) s"
fi
