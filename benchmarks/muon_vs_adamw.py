"""Muon hybrid vs AdamW-only on the default CPU config, same steps, seed and data.

    python benchmarks/muon_vs_adamw.py [--max-steps 120] [--eval-every 20] [--out benchmarks/results/muon_vs_adamw]

Writes val-loss curves (PNG), a markdown table, and prints the steps-to-equal-loss ratio: the step at
which Muon first reaches AdamW's final val loss, over AdamW's step count; and the same in training time
(the summed step times of each run up to those steps, evaluation excluded), which charges Muon for its
more expensive optimizer step.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from common import table

from blueberry.configs import get_config
from blueberry.runs.layout import read_metrics
from blueberry.training.run import run_training


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-steps", type=int, default=120)
    ap.add_argument("--eval-every", type=int, default=20)
    ap.add_argument("--out", default="benchmarks/results/muon_vs_adamw")
    args = ap.parse_args()
    out = Path(args.out)
    curves, seconds = {}, {}
    stamp = time.strftime("%Y%m%d-%H%M%S")  # fresh run directories: earlier runs are never touched
    for name in ("muon", "adamw"):
        run_dir = out / f"{name}-{stamp}"
        cfg = get_config("cpu", optimizer=name, max_steps=args.max_steps, eval_every=args.eval_every,
                         checkpoint_every=args.max_steps, out_dir=str(run_dir))
        run_training(cfg)
        evals = [r for r in read_metrics(run_dir) if r["kind"] == "eval"]
        curves[name] = [(r["step"], r["loss"]) for r in evals]
        elapsed = 0.0
        for r in (r for r in read_metrics(run_dir) if r["kind"] == "train"):
            elapsed += r["step_time"]
            seconds[(name, r["step"])] = elapsed
    target = curves["adamw"][-1][1]
    reach = next((s for s, l in curves["muon"] if l <= target), None)
    ratio = (reach / curves["adamw"][-1][0]) if reach else None
    rows = [[s, f"{m:.4f}", f"{a:.4f}"] for (s, m), (_, a) in zip(curves["muon"], curves["adamw"])]
    md = table(["step", "Muon hybrid val loss", "AdamW val loss"], rows)
    if ratio:
        t_muon, t_adamw = seconds[("muon", reach)], seconds[("adamw", curves["adamw"][-1][0])]
        md += (f"\n\nMuon reaches AdamW's final val loss ({target:.4f}) at step {reach}: "
               f"steps-to-equal-loss ratio {ratio:.2f}; training time {t_muon:.0f} s vs {t_adamw:.0f} s: "
               f"time-to-equal-loss ratio {t_muon / t_adamw:.2f}")
    else:
        md += f"\n\nMuon did not reach AdamW's final val loss ({target:.4f}) within {args.max_steps} steps"
    (out / "table.md").write_text(md + "\n")
    (out / "curves.json").write_text(json.dumps(curves))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for name, pts in curves.items():
        plt.plot(*zip(*pts), "o-", label=name)
    plt.xlabel("optimizer step")
    plt.ylabel("val loss")
    plt.title("Muon hybrid vs AdamW (cpu preset)")
    plt.legend()
    plt.savefig(out / "curves.png", dpi=80)
    print(md)


if __name__ == "__main__":
    main()
