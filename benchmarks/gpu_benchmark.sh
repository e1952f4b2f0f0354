#!/usr/bin/env bash
# One-go GPU benchmark for an H100/H200 (or any CUDA GPU): bf16 vs FP8, MFU, tokens/s, memory.
#   bash benchmarks/gpu_benchmark.sh [preset]      (default preset: h100)
set -euo pipefail
cd "$(dirname "$0")/.."
PRESET=${1:-h100}
PY=${PYTHON:-python}
$PY -m blueberry info
$PY -m pytest -q tests/test_ops.py -k gpu
$PY benchmarks/training_speed.py --config "$PRESET" --repeats 1 --steps 5 \
    --variants pytorch-fp32,blueberry-nofp8,blueberry,hf
$PY benchmarks/moe_layer.py --tokens 65536 --d-model 1024 --d-ff 2048 --experts 8 --top-k 2
