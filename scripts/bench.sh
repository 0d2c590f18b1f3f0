#!/usr/bin/env bash
# README's main-job command: set up, build, and run the benchmark report on whatever device is here.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="$(bash scripts/setup.sh | tail -n 1)"
exec "$PY" benchmarks/report.py "$@"
