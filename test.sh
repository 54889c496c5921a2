#!/usr/bin/env bash
# Set everything up (venv, pinned requirements, Debian Chromium for browser tests) and run the test suite on
# $SDLORA_TEST_WORKERS (default 2) pytest-xdist workers. `./test.sh` runs everything (what CI runs); `./test.sh --fast`
# leaves out the tests marked slow; other arguments go to pytest (`-k engine`, `-n 0` for one process).
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh --browser
export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 GRADIO_ANALYTICS_ENABLED=False TOKENIZERS_PARALLELISM=false
workers="${SDLORA_TEST_WORKERS:-2}"
# One share of the cores per worker (and the CLI/server processes it starts): torch's default of one thread per core
# in every worker oversubscribes the machine, and spinning OpenMP threads then make the tiny models ~3x slower.
threads=$(( $(nproc) / (workers > 0 ? workers : 1) ))
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( threads > 0 ? threads : 1 ))}"
args=()
for arg in "$@"; do
  if [[ "$arg" == "--fast" ]]; then
    args+=(-m "not slow")
  else
    args+=("$arg")
  fi
done
# Tests that share a module-scoped fixture stay on one worker (conftest.py groups them), so it is built once.
exec .venv/bin/python -m pytest -q -n "$workers" --dist loadgroup ${args[@]+"${args[@]}"}
