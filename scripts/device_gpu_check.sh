#!/usr/bin/env bash
# `make gpu-check` on a GPU machine without this project's packages or internet (this workplace's
# lent GPU): install the wheels scripts/gpu_wheels.sh put in .gpu-wheels, then run the acceptance
# run with the machine's python. The JSON and the stages' log land in $OUT when it is set.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps .gpu-wheels/*.whl
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 DVC_NO_ANALYTICS=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
out=${OUT:-bench/.work/gpu-check}
python3 -m bench.gpu_check --budget-s "${BUDGET_S:-420}" --out "$out/gpu-check.json" "$@"
cp bench/.work/gpu-check/llama-2-7b/stages.log "$out/" 2>/dev/null || true
