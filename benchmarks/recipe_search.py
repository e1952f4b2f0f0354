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
line to CANDIDATES to try another.
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
CANDIDATES = {
    # the default before this search: MoE, 8 experts top-2, 400 steps of 16 x 256 tokens
    "baseline": ["--model-type", "moe", "--max-steps", "400"],
    # dense at the same width, as many steps as fit (the architecture benchmark: dense is ~2x faster per step)
    "dense": ["--model-type", "standard", "--max-steps", "1150"],
    "dense-wsd": ["--model-type", "standard", "--max-steps", "1150", "--schedule", "wsd"],
    "dense-lr03": ["--model-type", "standard", "--max-steps", "1150", "--lr", "0.03"],
    "dense-b32": ["--model-type", "standard", "--max-steps", "575", "--batch-size", "32"],
    "dense-d320": ["--model-type", "standard", "--max-steps", "900", "--d-model", "320", "--n-heads", "5"],
    # the 30 training plays are ~1.1M tokens: 1,150 steps of 4,096 tokens is ~4 epochs; fewer steps, or dropout
    "dense-700": ["--model-type", "standard", "--max-steps", "700"],
    "dense-drop": ["--model-type", "standard", "--max-steps", "1150", "--dropout", "0.1"],
}


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
    train = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
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
