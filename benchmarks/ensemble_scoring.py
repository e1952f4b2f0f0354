"""The final scoring of an ensemble run, timed part by part: what `--ensemble` does after its members finish
(load the members, rebuild the data from the cache, score the mixture on the validation windows, score the
run's tasks), without writing anything into the run.

    python benchmarks/ensemble_scoring.py RUN [--repeats 2]

Run it from a checkout of another commit (e.g. a `git worktree`) to compare that commit's scoring on the same
run. Each part's time is the best of `--repeats`; the figures it computes are printed beside them, so two
commits can be checked to agree.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from common import table

from blueberry.configs import AdaptiveMoEModelConfig
from blueberry.evaluation.run_tasks import task_scorer_factory
from blueberry.models.ensemble import EnsembleLM
from blueberry.system import set_cpu_threads
from blueberry.runs.ensemble_dir import ensemble_members
from blueberry.training.evaluation import evaluate_model
from blueberry.training.precision import choose_precision
from blueberry.training.run import build_data
from blueberry.runs.loading import load_model


def best_of(repeats: int, fn):
    times, result = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return min(times), result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    set_cpu_threads()
    run = Path(args.run)
    config = AdaptiveMoEModelConfig.from_dict(json.loads((run / "config.json").read_text()))
    rows = []
    seconds, ensemble = best_of(args.repeats, lambda: EnsembleLM(
        [load_model(str(m), "cpu")[0] for m in ensemble_members(run)]).eval())
    rows.append(["load the members", f"{seconds:.1f}", ""])
    seconds, (tokenizer, corpus, _, val_loader) = best_of(
        args.repeats, lambda: build_data(config, 0, 1))
    rows.append(["data from the cache", f"{seconds:.1f}", ""])
    precision = choose_precision(config, config.capabilities())
    seconds, result = best_of(args.repeats, lambda: evaluate_model(
        ensemble, val_loader, config, token_bytes=corpus.token_bytes, precision=precision))
    rows.append(["validation windows", f"{seconds:.1f}", f"bits per byte {result['bits_per_byte']:.6f}"])
    scorer = task_scorer_factory(config, tokenizer)
    if scorer is not None:
        seconds, scores = best_of(args.repeats, lambda: scorer(ensemble))
        rows.append(["tasks", f"{seconds:.1f}",
                     ", ".join(f"{k} {v:.4f}" for k, v in scores.items() if k.endswith("acc_norm"))])
    print(table(["part", "seconds", "figures"], rows))


if __name__ == "__main__":
    main()
