#!/usr/bin/env bash
# One call on a lent GPU machine: build with CUDA, run the whole test suite on the GPU, run the
# benchmark report, and leave everything under $OUT (logs, JUnit XML, JSON).
#   run: bash benchmarks/gpu_check.sh [report.py options]   (OUT defaults to ./benchmarks/out/gpu)
#   STAGES=build,test,bench (the default) picks stages, so the check can span two calls where one
#   call's time limit is short: STAGES=build,test, then STAGES=bench (the build stays installed).
#   TESTS=... picks the test files (default tests/); the first GPU run JIT-compiles every Triton
#   kernel variant the tests use (minutes; Triton caches them in ~/.triton for later calls).
#   The full report does not fit one 10-minute call; split it by suite, e.g.
#     STAGES=build,test, then STAGES=bench ... --suites stats,bn_act,conv,blocks --blocks resnet50,
#     then STAGES=bench ... --suites dense --dense-models densenet121 --dense-batches 64,256
#   (every DenseNet impl x dtype x batch is one training-step timing; torch.compile of a whole
#   DenseNet takes minutes: add --no-compile for a first pass).
# Copy $OUT/report_cuda_*.json to benchmarks/results/ and commit it.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/benchmarks/out/gpu}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  nvcc --version | tail -n 2
} > "$OUT/environment.txt" 2>&1
cat "$OUT/environment.txt"

STAGES=",${STAGES:-build,test,bench},"
build_rc=0; test_rc=0; bench_rc=0
if [[ $STAGES == *,build,* ]]; then
echo "== build (CUDA kernels for sm_90)"
TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" "$PY" -m pip install -v --no-build-isolation --no-deps . \
  > "$OUT/build.log" 2>&1
build_rc=$?
grep -E "fusedres build" "$OUT/build.log" | head -n 1
[ $build_rc -eq 0 ] || { tail -n 40 "$OUT/build.log"; exit $build_rc; }
fi

if [[ $STAGES == *,test,* ]]; then
echo "== tests on the GPU (property tests: ${FUSEDRES_PROPERTY_EXAMPLES:=200} examples each)"
"$PY" -c "import hypothesis" 2>/dev/null || echo "   hypothesis is not installed: the property tests draw seeded random examples"
FUSEDRES_PROPERTY_EXAMPLES=$FUSEDRES_PROPERTY_EXAMPLES PYTHONSAFEPATH=1 "$PY" -m pytest -q -p no:cacheprovider --maxfail=25 --junitxml="$OUT/tests.xml" -rs \
  --durations=25 ${TESTS:-tests/} \
  > "$OUT/tests.log" 2>&1
test_rc=$?
tail -n 15 "$OUT/tests.log"
fi

if [[ $STAGES == *,bench,* ]]; then
echo "== benchmarks (conv kernels autotuned per shape: FUSEDRES_AUTOTUNE=${FUSEDRES_AUTOTUNE:-1})"
"$PY" benchmarks/report.py --out "$OUT" "$@" > "$OUT/report.txt" 2>&1
bench_rc=$?
tail -n 60 "$OUT/report.txt"
fi
echo "tests rc=$test_rc bench rc=$bench_rc; files in $OUT"
exit $(( test_rc != 0 || bench_rc != 0 ))
