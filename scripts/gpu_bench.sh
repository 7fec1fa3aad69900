#!/usr/bin/env bash
# The GPU table of docs/performance.md on ONE NVIDIA H100 / H200 (JAX with CUDA, PyTorch with
# CUDA and transformers installed; no network needed), in one process of about 8 minutes: see
# scripts/gpu_bench.py for the rows. Writes OUT_DIR/gpu_bench.json (after every row) and a
# kernel-level trace of steady decode at batch 64, and prints the table last.
#
# Usage:  scripts/gpu_bench.sh [OUT_DIR] [gpu_bench.py options, e.g. --rows decode_b1,decode_b64]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-bench-gpu-$(date +%Y%m%d-%H%M%S)}
shift || true
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
{
  date -u +"%Y-%m-%dT%H:%M:%SZ"
  echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader \
    || echo "nvidia-smi not found: NOT a GPU machine, figures below are not GPU figures"
} | tee "$OUT/machine.txt"
exec "${PYTHON:-python}" scripts/gpu_bench.py --out "$OUT" "$@"
