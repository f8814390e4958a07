#!/usr/bin/env bash
# The GPU check: run it first in a session lent a GPU. Stages and settings: benchmarks/gpu_check.py.
#   bash benchmarks/gpu_check.sh                       # tests, suite (eager + compiled), fsdp, compare: <= 8 min
#   STAGES="tests suite" bash benchmarks/gpu_check.sh   # chosen stages (optional ones: generation, quickstart)
#   DRY_RUN=1 bash benchmarks/gpu_check.sh              # every stage at a tiny size on the CPU, a minute or two
# Writes gpu_check.md, gpu_check.json and gpu_check.log to $OUT (default bench_out/gpu_check). Uses the
# checkout's sources (PYTHONPATH=src), so nothing needs installing; $PYTHON overrides python3.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec "${PYTHON:-python3}" benchmarks/gpu_check.py "$@"
