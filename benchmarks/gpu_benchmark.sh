#!/usr/bin/env bash
# One-go GPU benchmark for an H100/H200 (or any CUDA GPU): bf16 vs FP8, MFU, tokens/s, memory.
# (benchmarks/gpu_checks.sh runs the same benchmarks after a real training run, each step under a time limit.)
#   bash benchmarks/gpu_benchmark.sh [preset]      (default preset: h100)
set -euo pipefail
cd "$(dirname "$0")/.."
PRESET=${1:-h100}
PY=${PYTHON:-python}
$PY -m blueberry info
$PY -m pytest -q tests -k "gpu or cuda"   # the GPU-only tests (FP8, fused cross-entropy, MoE)
$PY benchmarks/training_speed.py --config "$PRESET" --repeats 1 --steps 5 \
    --variants pytorch-fp32,blueberry-nofp8,blueberry,blueberry-adamw,hf,hf-compiled
$PY benchmarks/moe_layer.py --tokens 65536 --d-model 1024 --d-ff 2048 --experts 8 --top-k 2
$PY benchmarks/cross_entropy.py --tokens 65536 --d-model 1024 --vocab 32768
