#!/usr/bin/env bash
# README's test command: set up, build, run the whole test suite (CPU: Triton under the interpreter).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="$(bash scripts/setup.sh | tail -n 1)"
# PYTHONSAFEPATH=1 keeps the working directory off sys.path, so the tests import the installed
# package (with fusedres._C), not ./fusedres, which has no compiled extension.
PYTHONSAFEPATH=1 exec "$PY" -m pytest -q -p no:cacheprovider "$@"
