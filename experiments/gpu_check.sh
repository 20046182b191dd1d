#!/usr/bin/env bash
# GPU readiness check ("R1M for real", item 4): images/s per GPU at 1024 px for MobileNetV2 and ResNet-101, the
# bare forward next to the extraction mapper, GPU utilisation and the ratio; < 8 minutes on one GPU.
#
#   bash experiments/gpu_check.sh [extra experiments.gpu_check flags]   # e.g. --device cpu --n 8 (dry run)
#
# Installs nothing: runs $PYTHON (default: python3 on PATH, which holds torch on the GPU image) from the
# repository root. The summary goes to $OUT (gpu_check.json, gpu_check.md, gpu_check.log) when OUT is set.
# BUDGET_S (default 360) is the Python side's own budget; the whole script is stopped at TIMEOUT_S (420).
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -n "${OUT:-}" ]; then mkdir -p "$OUT"; LOG="$OUT/gpu_check.log"; else LOG=/dev/null; fi
{
  echo "host $(hostname) $(date -u +%FT%TZ) python $("$PY" -c 'import sys; print(sys.version.split()[0])')"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  timeout "${TIMEOUT_S:-420}" "$PY" -m experiments.gpu_check --budget-s "${BUDGET_S:-360}" "$@"
} 2>&1 | tee "$LOG"
exit "${PIPESTATUS[0]}"
