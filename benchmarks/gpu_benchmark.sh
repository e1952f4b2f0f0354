#!/usr/bin/env bash
# One-go GPU benchmark for an H100/H200 (or any CUDA GPU): the GPU tests, a short training run of the
# device's default, then bf16 vs FP8, MFU, tokens/s and memory (training_speed.py), the MoE layer and the
# fused cross-entropy. It is benchmarks/gpu_checks.sh with every part; logs go to LOGDIR (default gpu_checks/).
#   bash benchmarks/gpu_benchmark.sh [preset] [LOGDIR]      (default preset: h100)
set -euo pipefail
PRESET=${1:-h100} exec bash "$(dirname "$0")/gpu_checks.sh" "${2:-gpu_checks}" all
