"""Learning-rate sweep: the same run (seed, data, steps) once per learning rate, then a table and plot."""

from __future__ import annotations

import json
from pathlib import Path

from ..logs import get_logger
from ..runs.layout import default_run_dir, read_metrics
from .plots import plot_sweep
from .run import run_training

log = get_logger(__name__).info


def run_lr_sweep(config, lrs: list[float], **run_kwargs) -> list[dict]:
    root = Path(config.training.out_dir) if config.training.out_dir else default_run_dir(config).with_name(
        default_run_dir(config).name + "-lr-sweep")
    results, curves = [], {}
    for lr in lrs:
        run_dir = root / f"lr_{lr:g}"
        log(f"\n=== sweep: lr={lr:g} -> {run_dir} ===")
        _, metrics = run_training(config.replace(lr=lr, out_dir=str(run_dir)), **run_kwargs)
        evals = [r for r in read_metrics(run_dir) if r["kind"] == "eval"]
        curves[lr] = ([r["step"] for r in evals], [r["loss"] for r in evals])
        results.append({"lr": lr, "val_loss": metrics.get("loss", float("inf")),
                        "bits_per_byte": metrics.get("bits_per_byte"), "run_dir": str(run_dir),
                        "stop_signal": metrics.get("stop_signal")})
        if metrics.get("stop_signal"):
            log(f"Sweep stopped by a signal during lr={lr:g}; the runs so far are in {root}")
            break
    best = min(results, key=lambda r: r["val_loss"])
    lines = ["| lr | val loss | bits/byte | |", "|---|---|---|---|"]
    for r in results:
        bpb = f"{r['bits_per_byte']:.4f}" if r["bits_per_byte"] is not None else "n/a"
        lines.append(f"| {r['lr']:g} | {r['val_loss']:.4f} | {bpb} | {'**best**' if r is best else ''} |")
    table = "\n".join(lines)
    (root / "sweep.md").write_text(table + "\n")
    (root / "sweep.json").write_text(json.dumps({"results": results, "best_lr": best["lr"]}, indent=2))
    plot_sweep(results, curves, root / "sweep.png")
    log("\n" + table)
    log(f"Best lr {best['lr']:g}; table {root / 'sweep.md'}, plot {root / 'sweep.png'}")
    return results
