#!/usr/bin/env bash
# The GPU checks in one go, most important first, each under its own time limit so that one hang or crash
# costs only its own step: the GPU-only tests, a short real training run on the device's default recipe
# (FP8 where the GPU has it, compiled) followed by generate and eval of that run, then the speed benchmarks
# (the MoE layer, the fused cross-entropy, the seed's table — "standard PyTorch" = fp32 eager with unfused AdamW
# vs Blueberry bf16 vs Blueberry FP8 at the default and h100 shapes — and batch-1/16 decode against
# transformers' generate()). gpu_benchmark.sh runs it whole. Every step's output goes to LOGDIR/gpu_checks.log,
# the run's summary, config and metrics beside it (LOGDIR defaults to $OUT when the device tool sets it).
#   bash benchmarks/gpu_checks.sh [LOGDIR]        (default: $OUT or gpu_checks/)
#   bash benchmarks/gpu_checks.sh LOGDIR checks   (only the tests and the training run; `bench`: only the benchmarks;
#                                                 `optimizer`: benchmarks/muon_step.py and a training run's optimizer share;
#                                                 `fp8-loss`: STEPS-step runs with --fp8 off and on, their losses side by side)
# The training run logs its FP8 decision (`--fp8 auto`: a timed step at the run's shapes, training/fp8_choice.py),
# tokens/s, MFU, peak memory and optimizer share per step (metrics.jsonl).
# Environment: PYTHON (default python), STEPS (training steps, default 200), TRAIN_LIMIT (its seconds, 300), PRESET (speed benchmark, h100),
# VARIANTS (training_speed.py's variants at PRESET, default: both blueberry precisions and hf; the fp32 baseline
# of the seed's table runs at PRESET's shapes with 4 layers, where the full depth does not finish in time).
set -uo pipefail
cd "$(dirname "$0")/.."
LOG_DIR=${1:-${OUT:-gpu_checks}}
PART=${2:-all}
PY=${PYTHON:-python}
STEPS=${STEPS:-200}
TRAIN_LIMIT=${TRAIN_LIMIT:-300}
PRESET=${PRESET:-h100}
VARIANTS=${VARIANTS:-blueberry-nofp8,blueberry,hf}
WORK=$(mktemp -d)
mkdir -p "$LOG_DIR"
LOG="$LOG_DIR/gpu_checks.log"
export PYTHONUNBUFFERED=1

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log its output, status and wall time
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit}s): $*" | tee -a "$LOG"
    local start=$SECONDS
    timeout --kill-after=10 "$limit" "$@" >>"$LOG" 2>&1
    local rc=$?
    echo "=== $name: exit $rc after $((SECONDS - start))s" | tee -a "$LOG"
}

train_run() {  # a short real run on the device's default recipe; its summary and last metrics kept
    step train "$TRAIN_LIMIT" $PY train.py --max-steps "$STEPS" --compile --eval-every $((STEPS / 2)) --out-dir "$WORK/run" \
        --cache-dir "$WORK/cache" "$@"
    cp "$WORK/run/summary.json" "$LOG_DIR/train_summary.json" 2>/dev/null
    cp "$WORK/run/config.json" "$LOG_DIR/train_config.json" 2>/dev/null
    grep '"kind": "train"' "$WORK/run/metrics.jsonl" 2>/dev/null | tail -5 >"$LOG_DIR/train_metrics_tail.jsonl"
}

checks() {
    step nvidia-smi 20 nvidia-smi
    step info 60 $PY -m blueberry info
    step gpu-tests 240 $PY -m pytest -q tests/test_ops.py tests/test_cross_entropy.py tests/test_models.py \
        tests/test_step_efficiency.py
    train_run
    if [ -f "$WORK/run/summary.json" ]; then
        step generate 90 $PY -m blueberry generate --checkpoint "$WORK/run" --prompt "ROMEO:" --max-new-tokens 64
        step eval 120 $PY -m blueberry eval --checkpoint "$WORK/run" --tasks auto
    fi
}

optimizer() {  # the optimizer step alone, then its share of a real training step
    train_run --eval-tasks none
    step muon-step 60 $PY benchmarks/muon_step.py --presets default,h100
}

bench() {
    step moe-layer 60 $PY benchmarks/moe_layer.py --tokens 65536 --d-model 1024 --d-ff 2048 --experts 8 --top-k 2
    step cross-entropy 60 $PY benchmarks/cross_entropy.py --tokens 65536 --d-model 1024 --vocab 32768
    # the seed's table at the GPU default's shapes, and bf16 vs FP8 there and at the h100 preset's
    step seed-table-default 240 $PY benchmarks/training_speed.py --config default --repeats 1 --steps 5 --models moe \
        --variants pytorch-fp32,blueberry-nofp8,blueberry
    step training-speed 300 $PY benchmarks/training_speed.py --config "$PRESET" --repeats 1 --steps 5 --models moe \
        --variants "$VARIANTS"
    step seed-table-preset 240 $PY benchmarks/training_speed.py --config "$PRESET" --n-layers 4 --repeats 1 --steps 5 \
        --models moe --variants pytorch-fp32,blueberry-nofp8,blueberry
    step decode 240 $PY benchmarks/decode_speed.py --config default --models moe --dtypes bf16 --batches 1,16 \
        --repeats 2 --new-tokens 128
}

fp8_loss() {  # item 2 of #31: the loss after STEPS steps with FP8 off and on (same seed, same data)
    for mode in off on; do
        step "train-fp8-$mode" "$TRAIN_LIMIT" $PY train.py --max-steps "$STEPS" --compile --fp8 $mode --eval-every "$STEPS" \
            --eval-tasks none --out-dir "$WORK/fp8-$mode" --cache-dir "$WORK/cache"
        cp "$WORK/fp8-$mode/summary.json" "$LOG_DIR/fp8_${mode}_summary.json" 2>/dev/null
    done
}

case $PART in
    checks) checks ;;
    bench) bench ;;
    optimizer) optimizer ;;
    fp8-loss) fp8_loss ;;
    *) checks; bench ;;
esac
rm -rf "$WORK"
