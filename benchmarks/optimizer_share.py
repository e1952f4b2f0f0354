"""The optimizer's share of a training step at a preset's shapes, measured on this machine.

    python benchmarks/optimizer_share.py [--presets cpu,rtx4090,h100] [--rows 1] [--ns-steps 5]

For each preset: its model (width, heads, experts, vocabulary, sequence length, model type) built with 1 and
with 2 blocks, bf16 autocast where the device has it, eager. Forward+backward is timed on `--rows` sequences
of the preset's length and scaled to the preset's batch (its cost is linear in the rows); the optimizer step
(every optimizer of the run: Muon on the hidden matrices, AdamW on the rest) is timed as it is. Each cost at
the preset's depth L is cost(1) + (L - 1) * (cost(2) - cost(1)): a block's share, plus the embedding and head
once. share = optimizer / (forward+backward + optimizer), the `optimizer_share` that training logs. On a CPU
this measures CPU kernels: a GPU's ratio of matmul speeds at these shapes differs.
"""

from __future__ import annotations

import argparse

import torch
from common import table, timed

from blueberry.configs import get_config
from blueberry.models import create_model
from blueberry.optimizers.factory import setup_optimizers


def step_costs(preset: str, layers: int, rows: int, ns_steps: int) -> tuple[float, float]:
    """(forward+backward seconds at the preset's batch, optimizer step seconds) with `layers` blocks."""
    cfg = get_config(preset, device="cpu", use_fp8=False, n_layers=layers, compile=False).validate()
    torch.manual_seed(0)
    model = create_model(cfg)
    optimizers = setup_optimizers(model, cfg)
    for opt in optimizers:
        for group in opt.param_groups:
            if "ns_steps" in group:
                group["ns_steps"] = ns_steps
    ids = torch.randint(0, cfg.vocab_size, (rows, cfg.max_seq_len + 1))
    amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.use_amp)

    def forward_backward():
        model.zero_grad(set_to_none=False)
        with amp:
            loss = model(ids[:, :-1], targets=ids[:, 1:]).loss
        loss.backward()

    def step():
        for opt in optimizers:
            opt.step()

    fb = timed(forward_backward, warmup=1, repeats=3, stat="min") * cfg.batch_size / rows
    forward_backward()
    return fb, timed(step, warmup=1, repeats=3, stat="min")


def measure(preset: str, rows: int, ns_steps: int) -> list:
    cfg = get_config(preset, device="cpu", use_fp8=False).validate()
    (fb1, opt1), (fb2, opt2) = (step_costs(preset, n, rows, ns_steps) for n in (1, 2))
    depth = cfg.n_layers
    fb, opt = fb1 + (depth - 1) * (fb2 - fb1), opt1 + (depth - 1) * (opt2 - opt1)
    return [preset, cfg.model.architecture, cfg.d_model, depth, cfg.batch_size * cfg.max_seq_len,
            f"{fb:.2f}", f"{opt:.2f}", f"{opt / (fb + opt):.2f}"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--presets", default="cpu,rtx4090,h100")
    ap.add_argument("--rows", type=int, default=1)
    ap.add_argument("--ns-steps", type=int, default=5)
    args = ap.parse_args()
    rows = []
    for preset in args.presets.split(","):
        rows.append(measure(preset, args.rows, args.ns_steps))
        print(" | ".join(map(str, rows[-1])), flush=True)
    print(table(["preset", "model", "d_model", "layers", "tokens/step", "fwd+bwd s", "optimizer s", "share"], rows))


if __name__ == "__main__":
    main()
