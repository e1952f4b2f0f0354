"""The whole optimizer step of a run (Muon on the hidden matrices, AdamW on the rest) at a preset's shapes,
on the best device here: Newton-Schulz with every same-shape parameter joined into one batched call (the
default: one call per shape, e.g. the expert stacks of every layer together) vs one call per parameter.

    python benchmarks/muon_step.py [--presets default,h100] [--repeats 10]

Gradients are random (the step's cost does not depend on their values); the model is built on the device in
fp32 as training keeps it. Times are the median of `--repeats` steps after 3 warm-up steps, synchronised on a
GPU. The training log's `optimizer_share` is this step's time over the whole training step.
"""

from __future__ import annotations

import argparse
import time

import torch
from common import table

from blueberry.configs import get_config
from blueberry.models import create_model
from blueberry.optimizers.factory import setup_optimizers
from blueberry.optimizers.muon import Muon


def step_seconds(optimizers, device: torch.device, repeats: int) -> float:
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    times = []
    for i in range(3 + repeats):
        sync()
        t0 = time.perf_counter()
        for opt in optimizers:
            opt.step()
        sync()
        if i >= 3:
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def measure(preset: str, repeats: int) -> list:
    cfg = get_config(preset, use_fp8=False, compile=False).validate()
    device = torch.device("cuda" if cfg.capabilities().is_cuda else "cpu")
    torch.manual_seed(0)
    model = create_model(cfg).to(device)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    optimizers = setup_optimizers(model, cfg)
    muons = [opt for opt in optimizers if isinstance(opt, Muon)]
    results = {}
    for joined in (False, True):
        for muon in muons:
            muon.batch_parameters = joined
        results[joined] = step_seconds(optimizers, device, repeats)
    params = sum(p.numel() for p in model.parameters())
    return [preset, cfg.model.architecture, f"{params / 1e6:.0f}M", device.type,
            f"{results[False] * 1e3:.1f}", f"{results[True] * 1e3:.1f}", f"{results[False] / results[True]:.2f}x"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--presets", default="default,h100")
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    rows = []
    for preset in args.presets.split(","):
        rows.append(measure(preset, args.repeats))
        print(" | ".join(rows[-1]), flush=True)
    print(table(["preset", "model", "parameters", "device", "per parameter ms", "joined ms", "speed-up"], rows))


if __name__ == "__main__":
    main()
