"""Eager vs torch.compile for one training step (bf16 autocast where supported, fused AdamW).

    python benchmarks/compile_speedup.py [--model moe|standard] [--config cpu] [--steps 4]

Prints eager s/step, compile time (first two compiled steps) and compiled s/step side by side.
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch
from common import table

from blueberry.configs import get_config
from blueberry.models import create_model
from blueberry.system import set_cpu_threads


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="moe", choices=("moe", "standard"))
    ap.add_argument("--config", default="cpu")
    ap.add_argument("--steps", type=int, default=4)
    args = ap.parse_args()
    set_cpu_threads()
    cfg = get_config(args.config, model_type=args.model).validate()
    caps = cfg.capabilities()
    device = torch.device("cuda" if caps.is_cuda else "cpu")
    model = create_model(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), fused=True)
    idx = torch.randint(0, cfg.vocab_size, (cfg.batch_size, cfg.max_seq_len), device=device)
    amp = caps.autocast_dtype

    def step(m):
        with torch.autocast(device.type, dtype=amp) if amp else contextlib.nullcontext():
            loss = m(idx, idx).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()

    def per_step(m):
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step(m)
        return (time.perf_counter() - t0) / args.steps

    for _ in range(2):
        step(model)
    eager = per_step(model)
    compiled = torch.compile(model)
    t0 = time.perf_counter()
    step(compiled)
    step(compiled)
    compile_s = time.perf_counter() - t0
    fast = per_step(compiled)
    print(table(["model", "eager s/step", "compiled s/step", "speed-up", "compile + 2 steps (s)"],
                [[args.model, f"{eager:.3f}", f"{fast:.3f}", f"{eager / fast:.2f}x", f"{compile_s:.1f}"]]))


if __name__ == "__main__":
    main()
