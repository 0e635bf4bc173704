#!/usr/bin/env bash
# The GPU proof in one command, offline, under 8 minutes on one GPU (see benchmarks/README.md):
#   bash benchmarks/gpu_proof.sh            # on the GPU machine; writes BENCHMARKS.md's GPU section
#   bash benchmarks/gpu_proof.sh --tiny     # every step on the CPU (what the tests run)
# Exits 0 when the job succeeded, its parity probe passed and the simulated MPS run was stopped in time.
set -euo pipefail
cd "$(dirname "$0")/.."
export YOLO_OFFLINE=true
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
if [ "${1:-}" != "--tiny" ] && command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
fi
exec "$PY" benchmarks/gpu_proof.py "$@"
