"""The default-recipe speedrun: candidate recipes trained from `train.py` under one wall-clock budget.

    python benchmarks/recipe_search.py [--candidates baseline,dense,...] [--seeds 0] [--budget-minutes 10]
                                       [--out-root /tmp/recipes]

Every candidate trains on the default corpus with `--test-fraction 0.1`: four plays are validation (the
score that picks the recipe), four more are a test split nothing is tuned on, scored once at the end.
The wall time is the whole `train.py` process (data, tokenizer, compilation, evaluations included); a
run over the budget is marked, not dropped. Reported: validation and test bits per byte, steps, mean
optimizer share of the step (from metrics.jsonl), wall minutes. Results are appended to
OUT_ROOT/results.jsonl, one line per run, so a search can be run in pieces.

The candidates below are the ones tried so far (docs/LOG.md has every result, negative ones too); add a
line to CANDIDATES to try another. Every candidate of the search is one run of its fixed length (`--ensemble
1`, 900 steps unless it says otherwise); `default` is what `python train.py` does now (since session 10: one
model planned by the time budget; in sessions 7-9 two runs averaged, now `ensemble2`), and the recipe of
session 5 is `single`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import ROOT, table

COMMON = ["--test-fraction", "0.1"]


def dense(steps: int, *extra: str) -> list[str]:
    return ["--model-type", "standard", "--max-steps", str(steps), *extra]


# the third round's combination: a 4,096-token vocabulary, weight decay 0.1, QK-norm
C3 = ("--vocab-size", "4096", "--weight-decay", "0.1", "--qk-norm")
SINGLE_RUNS = {
    # one run of the CPU recipe: `python train.py` until session 7 (named "default" in docs/LOG.md before then)
    "single": [],
    # the default before this search: MoE, 8 experts top-2, 400 steps of 16 x 256 tokens
    "baseline": ["--model-type", "moe", "--max-steps", "400"],
    # first round: dense at the same width, as many steps as fit (the architecture benchmark: dense is ~2x
    # faster per step); the 30 training plays are ~1.1M tokens: 1,150 steps of 4,096 tokens is ~4 epochs
    "dense": dense(1150),
    # named but not run (later rounds went elsewhere): dense-wsd, dense-lr03, dense-b32, dense-d320, c3-d384,
    # c3-lr03 (stopped for the fifth round), c3-900-wd02-lr03 (lr 0.03 lost on its own)
    "dense-wsd": dense(1150, "--schedule", "wsd"),
    "dense-lr03": dense(1150, "--lr", "0.03"),
    "dense-b32": dense(575, "--batch-size", "32"),
    "dense-d320": dense(900, "--d-model", "320", "--n-heads", "5"),
    "dense-700": dense(700),
    "dense-drop": dense(1150, "--dropout", "0.1"),
    # second round, each one change from dense-700: vocabulary, weight decay, QK-norm
    "d700-v4096": dense(700, "--vocab-size", "4096"),
    "d700-v2048": dense(700, "--vocab-size", "2048"),
    "d700-wd": dense(700, "--weight-decay", "0.1"),
    "d700-qkn": dense(700, "--qk-norm"),
    # third round: the three small gains of the second together, then one change each: context 512 at the
    # same tokens per step, ReLU² (its d_ff defaults to 4 d_model: SwiGLU's parameters), more steps
    "c3": dense(700, *C3),
    "c3-s512": dense(700, *C3, "--seq-len", "512", "--batch-size", "8"),
    "c3-relu2": dense(700, *C3, "--mlp-type", "relu2"),
    "c3-900": dense(900, *C3),
    # fourth round, one change each from c3: weight decay 0.2, width 384 (fewer steps), untied head, lr 0.03
    "c3-wd02": dense(700, "--vocab-size", "4096", "--weight-decay", "0.2", "--qk-norm"),
    "c3-d384": dense(450, *C3, "--d-model", "384", "--n-heads", "6"),
    "c3-untied": dense(700, *C3, "--no-tie-embeddings"),
    "c3-lr03": dense(700, *C3, "--lr", "0.03"),
    # fifth round: c3 ran 900 steps to 1.8371 (no overfitting with weight decay): how many steps pay
    "c3-1100": dense(1100, *C3),
    "c3-1300": dense(1300, *C3),
    # sixth round, one change each from c3-900 (1,100 steps scored worse: 1.8524): weight decay 0.2, lr 0.03
    "c3-900-wd02": dense(900, "--vocab-size", "4096", "--weight-decay", "0.2", "--qk-norm"),
    "c3-900-lr03": dense(900, *C3, "--lr", "0.03"),
    # seventh round: more steps with the stronger weight decay; and the two sixth-round changes together
    "c3-1000-wd02": dense(1000, "--vocab-size", "4096", "--weight-decay", "0.2", "--qk-norm"),
    "c3-900-wd02-lr03": dense(900, "--vocab-size", "4096", "--weight-decay", "0.2", "--qk-norm", "--lr", "0.03"),
    # the MoE (8 experts, top-2) with the same changes, for the steps that take the dense run's wall time (an
    # MoE step costs ~1.75 dense steps here: baseline 400 steps and dense-700 both took 5.7 min)
    "moe-c3": ["--model-type", "moe", "--max-steps", "515", "--vocab-size", "4096", "--weight-decay", "0.2",
               "--qk-norm"],
    # after the decision, from the new default: a warm-up-stable-decay schedule; wider and fewer steps
    "default-wsd": ["--schedule", "wsd"],
    "default-d320": ["--d-model", "320", "--n-heads", "5", "--max-steps", "700"],
    # eighth round (session 6), the data-limited regime (~3.3 epochs of the 30 training plays): regularize.
    # Tried as patches, not flags (docs/patches/*.diff: apply, set the variable, run `--candidates default`):
    # logit soft-capping, an embedding skip into every block, value embeddings (docs/LOG.md, session 6)
    "default-drop": ["--dropout", "0.1"],
    "default-wd04": ["--weight-decay", "0.4"],
    # the learning rates and schedule end not yet swept: AdamW's (tied embedding/head, norms), decay to zero
    "default-alr6": ["--adamw-lr", "0.006"],
    "default-minlr0": ["--min-lr-ratio", "0"],
    # the same tokens in smaller batches (twice the steps); deeper and narrower at about the same parameters
    "default-b8": ["--batch-size", "8", "--max-steps", "1800"],
    "default-d192l6": ["--d-model", "192", "--n-heads", "3", "--n-layers", "6"],
    # a lower Muon learning rate (0.03 lost); twice the heads of half the width
    "default-lr015": ["--lr", "0.015"],
    "default-h8": ["--n-heads", "8"],
    # ninth round (session 7): members of an average of runs (benchmarks/ensemble.py) — shorter, so that two
    # fit in the budget side by side, one core each
    "default-s700": ["--max-steps", "700"],
}
# Every candidate above was one model of the recipe's 900 steps unless it says otherwise: it stays so
# (--ensemble 1, --max-steps 900), whatever the default now is.
CANDIDATES = {name: [*flags, "--ensemble", "1", *([] if "--max-steps" in flags else ["--max-steps", "900"])]
              for name, flags in SINGLE_RUNS.items()}
CANDIDATES.update({
    # whatever `python train.py` picks on this machine now: one model, its size and length planned from the
    # data and the 10-minute budget (training/budget.py, training/sizing.py; #28)
    "default": [],
    # the CPU default of sessions 7-9: two runs of 800 steps averaged (--ensemble 2)
    "ensemble2": ["--ensemble", "2"],
    "ensemble-s800": ["--ensemble", "2", "--max-steps", "800"],
})


def run(name: str, seed: int, out_root: Path, budget_s: float) -> dict:
    out = out_root / f"{name}-seed{seed}"
    subprocess.run(["rm", "-rf", str(out)])
    cmd = [sys.executable, "train.py", *COMMON, *CANDIDATES[name], "--seed", str(seed), "--out-dir", str(out)]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"{name} failed:\n{r.stderr[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    logs = [Path(m["run_dir"]) / "metrics.jsonl" for m in summary.get("members", [])] or [out / "metrics.jsonl"]
    train = [json.loads(line) for log in logs for line in log.read_text().splitlines()]
    shares = [t["optimizer_share"] for t in train if t.get("kind") == "train" and "optimizer_share" in t]
    return {"name": name, "seed": seed, "flags": CANDIDATES[name], "steps": summary["step"],
            "val_bpb": summary["bits_per_byte"], "test_bpb": summary.get("test_bits_per_byte"),
            "optimizer_share": statistics.median(shares) if shares else None, "wall_s": wall,
            "over_budget": wall > budget_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--candidates", default=",".join(CANDIDATES))
    ap.add_argument("--seeds", default="0", help="comma-separated seeds (the spread of a recipe: 0,1,2)")
    ap.add_argument("--budget-minutes", type=float, default=10.0)
    ap.add_argument("--out-root", type=Path, default=Path("/tmp/recipes"))
    args = ap.parse_args()
    args.out_root.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.candidates.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            result = run(name, seed, args.out_root, args.budget_minutes * 60)
            with open(args.out_root / "results.jsonl", "a") as f:
                f.write(json.dumps(result) + "\n")
            rows.append([name, seed, result["steps"], f"{result['val_bpb']:.4f}", f"{result['test_bpb']:.4f}",
                         f"{result['optimizer_share']:.2f}", f"{result['wall_s'] / 60:.1f}"
                         + (" (over)" if result["over_budget"] else "")])
            print(" | ".join(map(str, rows[-1])), flush=True)
    print(table(["recipe", "seed", "steps", "val bits/byte", "test bits/byte", "optimizer share", "wall min"], rows))


if __name__ == "__main__":
    main()
