"""What averaging several trained runs would score: validation bits per byte of each run alone and of the
mixture of their next-token distributions (the mean of their probabilities), on the validation windows the
runs' own evaluations used.

    python benchmarks/ensemble.py RUN RUN [RUN ...] [--batches 20] [--split val|test]

The runs must share a tokenizer and a validation split (e.g. `recipe_search.py --seeds 0,1,2` of one
recipe). Each run alone must reproduce the bits per byte of its summary.json (a check that the windows
and precision are the training run's); the ensemble is then scored the same way. `--split test` scores the
runs' test split (`--test-fraction`) whole, as the runs did at their end. A measurement for the
default-recipe search (#20): what a lever outside one model's recipe is worth.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from common import table

from blueberry.data.held_out import validation_loader
from blueberry.runs.loading import load_model
from blueberry.training.evaluation import _batch_totals
from blueberry.training.precision import choose_precision
from blueberry.training.test_split import held_out_test_loader


@torch.no_grad()
def scores(models, loader, token_bytes, precision) -> tuple[list[float], float]:
    """Bits per byte of each model and of the mixture of their distributions."""
    tb = torch.as_tensor(token_bytes)
    totals = [torch.zeros(6, dtype=torch.float64) for _ in range(len(models) + 1)]
    for batch in loader:
        x, y = batch[0], batch[1]
        logps = []
        for i, model in enumerate(models):
            with precision.autocast():
                logits = model(x).logits
            logps.append(torch.log_softmax(logits.float(), dim=-1))
            totals[i] += _batch_totals(logps[-1], y, tb)
        mixture = torch.logsumexp(torch.stack(logps), dim=0) - math.log(len(models))
        totals[-1] += _batch_totals(mixture, y, tb)
    bpb = [t[3].item() / math.log(2) / t[4].item() for t in totals]
    return bpb[:-1], bpb[-1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--batches", type=int, default=None, help="validation batches (default: the runs' own)")
    ap.add_argument("--split", choices=("val", "test"), default="val")
    args = ap.parse_args()
    loaded = [load_model(run, "cpu", torch.float32) for run in args.runs]
    models = [m.eval() for m, *_ in loaded]
    config, tokenizer = loaded[0][1], loaded[0][2]
    if any(t.token_bytes().tolist() != tokenizer.token_bytes().tolist() for _, _, t, _ in loaded[1:]):
        raise SystemExit("the runs have different tokenizers: their distributions cannot be mixed")
    if args.split == "test":
        if config.data.test_fraction <= 0:
            raise SystemExit("these runs have no test split (--test-fraction)")
        loader, _ = held_out_test_loader(config, tokenizer)
    else:
        loader = validation_loader(config, tokenizer, args.batches or config.training.eval_batches)
    alone, together = scores(models, loader, tokenizer.token_bytes(), choose_precision(config, config.capabilities()))
    rows = []
    for run, bpb in zip(args.runs, alone):
        summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").exists() else {}
        logged = summary.get("bits_per_byte" if args.split == "val" else "test_bits_per_byte")
        rows.append([run.name, f"{bpb:.4f}", f"{logged:.4f}" if logged is not None else "n/a"])
    rows.append([f"mixture of {len(models)}", f"**{together:.4f}**", ""])
    print(table(["run", f"{args.split} bits/byte (here)", f"{args.split} bits/byte (its summary)"], rows))


if __name__ == "__main__":
    main()
