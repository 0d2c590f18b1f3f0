#!/usr/bin/env bash
# The GPU check, in stages that fit a lent GPU machine (15 minutes of device time in all, start-up
# included, at most 10 per command, a cold Triton cache every start). Results go under $OUT
# (default ./benchmarks/out/gpu); copy them to benchmarks/results/ and commit them.
#
#   bash benchmarks/gpu_check.sh            stage 1 (within 8 minutes on a cold H200):
#                                           environment, build (sm_90 only), then the parts of
#                                           benchmarks/gpu_stage1.py, each under its own timeout
#   STAGES=tests bash benchmarks/gpu_check.sh     stage 2a: the whole test suite on the GPU, strict
#   STAGES=report bash benchmarks/gpu_check.sh [report.py options]   stage 2b: the benchmark report
#   DRY_RUN=1 bash benchmarks/gpu_check.sh  stage 1's plumbing on the CPU (CI): no build (the
#                                           installed package), toy sizes, Triton interpreted
#
# Stage 1's budgets, seconds (BUDGET_<part>=N overrides one): build 150, kernels 75, convs 75,
# bottleneck 30, resnet50 140, memory 35 = 505, plus ~10 for the environment. A part that runs out of time is
# killed; its JSON keeps what it measured ("finished": false; written before the part starts, so
# there is one whenever it is killed) and the next part runs.
# $OUT/stage1_summary.json lists every part: rc, seconds, timed_out.
# If the CUDA build fails, stage 1 says so (build.log, the summary), and goes on with the Triton
# kernels from the source tree (auto picks Triton where the CUDA kernels are missing).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/benchmarks/out/gpu}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
STAGES=",${STAGES:-1},"
DRY_RUN="${DRY_RUN:-0}"
export FUSEDRES_STRICT=1  # a fallback away from the kernels under test raises: no false green
SUMMARY="$OUT/stage1_summary.json"

summary_add() {  # part rc seconds budget [note]
  "$PY" - "$SUMMARY" "$@" <<'EOF'
import json, os, sys
path, part, rc, seconds, budget = sys.argv[1:6]
note = sys.argv[6] if len(sys.argv) > 6 else ""
data = json.load(open(path)) if os.path.exists(path) else {"parts": []}
data["parts"].append(dict(part=part, rc=int(rc), seconds=int(seconds), budget_s=int(budget),
                          timed_out=int(rc) in (124, 137), note=note))
data["total_s"] = sum(p["seconds"] for p in data["parts"])
data["ok"] = all(p["rc"] == 0 for p in data["parts"])
json.dump(data, open(path, "w"), indent=1)
EOF
}

part_record() {  # part budget: the part's JSON before it starts ("finished": false), written by
  # the shell, so a part killed at any moment, even before Python has imported torch and written
  # its own (a loaded machine can take longer than a short budget for that), leaves one
  local dry=false
  [ "$DRY_RUN" = 1 ] && dry=true
  printf '{"part": "%s", "budget_s": %s, "dry_run": %s, "finished": false, "rows": [], "started": "%s", "note": "written by gpu_check.sh before the part started"}\n' \
    "$1" "$2" "$dry" "$(date -u +%FT%TZ)" > "$OUT/stage1_$1.json"
}

budget() {  # part default
  local var="BUDGET_$1"
  echo "${!var:-$2}"
}

failed=0
if [[ $STAGES == *,1,* ]]; then
  rm -f "$SUMMARY"
  SECONDS=0
  {
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv 2>&1 || echo "no nvidia-smi"
    "$PY" -c "import torch, triton, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
    nvcc --version 2>&1 | tail -n 2
    date -u +%FT%TZ
  } > "$OUT/environment.txt" 2>&1
  cat "$OUT/environment.txt"
  summary_add environment 0 "$SECONDS" 10

  if [ "$DRY_RUN" = 1 ]; then
    export TRITON_INTERPRET=1
    summary_add build 0 0 0 "dry run: the installed package"
  else
    echo "== build (CUDA kernels for sm_90 only)"
    SECONDS=0
    b=$(budget build 150)
    TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
      timeout -k 5 "$b" "$PY" -m pip install -v --no-build-isolation --no-deps . > "$OUT/build.log" 2>&1
    rc=$?
    grep -E "fusedres build" "$OUT/build.log" | head -n 1
    if [ $rc -ne 0 ]; then
      tail -n 30 "$OUT/build.log"
      echo "== the CUDA build FAILED (rc $rc, build.log): going on with the Triton kernels from the source tree"
      export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # auto then picks Triton: no CUDA kernels
      summary_add build "$rc" "$SECONDS" "$b" "build failed: Triton kernels only, from the source tree"
      failed=1
    else
      summary_add build 0 "$SECONDS" "$b"
    fi
  fi

  DRY=()
  [ "$DRY_RUN" = 1 ] && DRY=(--dry-run)
  for spec in kernels:75 convs:75 bottleneck:30 resnet50:140 memory:35; do
    part="${spec%%:*}"
    b=$(budget "$part" "${spec##*:}")
    echo "== stage 1: $part (budget ${b}s)"
    part_record "$part" "$b"
    SECONDS=0
    # -k: a part that ignores the TERM (a kernel in flight) is killed 5 s later
    FUSEDRES_PART_BUDGET="$b" PYTHONSAFEPATH=1 timeout -k 5 "$b" "$PY" benchmarks/gpu_stage1.py "$part" --out "$OUT" "${DRY[@]}" \
      > "$OUT/stage1_$part.log" 2>&1
    rc=$?
    tail -n 8 "$OUT/stage1_$part.log"
    note=""
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then note="killed at its budget of ${b}s"; echo "   $note"; fi
    summary_add "$part" "$rc" "$SECONDS" "$b" "$note"
    [ $rc -eq 0 ] || failed=1
  done
  "$PY" -c "import json; d = json.load(open('$SUMMARY')); print('== stage 1:', 'ok' if d['ok'] else 'FAILED', 'in', d['total_s'], 's:', ', '.join(f\"{p['part']} {p['seconds']}s rc={p['rc']}\" for p in d['parts']))"
fi

if [[ $STAGES == *,tests,* ]]; then
  echo "== stage 2a: the test suite on the GPU, strict (property tests: ${FUSEDRES_PROPERTY_EXAMPLES:=50} examples each)"
  FUSEDRES_PROPERTY_EXAMPLES=$FUSEDRES_PROPERTY_EXAMPLES PYTHONSAFEPATH=1 "$PY" -m pytest -q -p no:cacheprovider \
    --maxfail=25 --junitxml="$OUT/tests.xml" -rs --durations=25 ${TESTS:-tests/} > "$OUT/tests.log" 2>&1
  rc=$?
  tail -n 15 "$OUT/tests.log"
  [ $rc -eq 0 ] || failed=1
fi

if [[ $STAGES == *,report,* ]]; then
  echo "== stage 2b: the benchmark report (conv kernels autotuned per shape: FUSEDRES_AUTOTUNE=${FUSEDRES_AUTOTUNE:-1})"
  "$PY" benchmarks/report.py --out "$OUT" "$@" > "$OUT/report.txt" 2>&1
  rc=$?
  tail -n 60 "$OUT/report.txt"
  [ $rc -eq 0 ] || failed=1
fi
echo "files in $OUT"
exit $failed
