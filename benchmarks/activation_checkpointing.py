"""Activation checkpointing none / selective / full at one shape, side by side: peak memory of a training
step and its time, each mode in its own process (so that each peak is its own), modes alternated.

    python benchmarks/activation_checkpointing.py [--config cpu] [--batch-size 16] [--steps 3] [--repeats 2]
        [--n-layers N]

Peak memory: on a GPU `torch.cuda.max_memory_allocated` over the timed steps, less what the model,
gradients and optimizer states hold before the first step; on a CPU the process's peak resident set
(ru_maxrss) less the resident set measured just before the first step — the activations the backward pass
needs, as the allocator saw them. Beside each: Blueberry's estimate of the same (training/memory.py).
Step time: fastest of --steps timed steps after one warm-up (eager; the model in the config's precision).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import subprocess
import sys

from common import ROOT, table, timed

MODES = ("none", "selective", "full")


def _rss_mb() -> float:
    with open("/proc/self/status", encoding="utf-8") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def worker(mode: str, preset: str, batch_size: int | None, n_layers: int | None, steps: int) -> dict:
    import torch

    from blueberry.configs import get_config
    from blueberry.models import create_model
    from blueberry.optimizers import setup_optimizers
    from blueberry.system import set_cpu_threads
    from blueberry.training.activation_checkpointing import apply_activation_checkpointing
    from blueberry.training.memory import estimate

    overrides = {k: v for k, v in dict(batch_size=batch_size, n_layers=n_layers).items() if v}
    cfg = get_config(preset, use_fp8=False, compile=False, activation_checkpointing=mode, **overrides).validate()
    device = torch.device("cuda" if cfg.capabilities().is_cuda else "cpu")
    set_cpu_threads()
    torch.manual_seed(0)
    model = apply_activation_checkpointing(create_model(cfg).to(device).train(), mode)
    optimizers = setup_optimizers(model, cfg)
    idx = torch.randint(0, cfg.vocab_size, (cfg.batch_size, cfg.max_seq_len), device=device)
    amp = cfg.capabilities().autocast_dtype if cfg.use_amp else None

    def step():
        with torch.autocast(device.type, dtype=amp) if amp else contextlib.nullcontext():
            loss = model(idx, idx).loss
        loss.backward()
        for o in optimizers:
            o.step()
            o.zero_grad(set_to_none=False)  # gradients stay allocated: the baseline holds them
        if device.type == "cuda":
            torch.cuda.synchronize()

    step()  # allocates gradients and optimizer states
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    else:
        base = _rss_mb()
    sec = timed(step, warmup=0, repeats=steps, stat="min")
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    est = estimate(model, cfg, checkpointing=mode, device_type=device.type)["activations"] / 2**20
    return {"mode": mode, "step_s": sec, "activation_mb": peak - base, "estimate_mb": est,
            "tokens": cfg.batch_size * cfg.max_seq_len, "device": cfg.capabilities().device_name}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="cpu")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--n-layers", type=int, default=None)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.config, args.batch_size, args.n_layers, args.steps)))
        return
    results: dict = {}
    for repeat in range(args.repeats):
        order = MODES[repeat % 3:] + MODES[:repeat % 3]
        for mode in order:
            cmd = [sys.executable, __file__, "--worker", mode, "--config", args.config, "--steps", str(args.steps)]
            cmd += ["--batch-size", str(args.batch_size)] if args.batch_size else []
            cmd += ["--n-layers", str(args.n_layers)] if args.n_layers else []
            out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            if out.returncode != 0:
                print(f"{mode} failed:\n{out.stderr[-2000:]}", file=sys.stderr)
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{mode}: {r['step_s']:.3f} s/step, activations {r['activation_mb']:.0f} MB", flush=True)
            results.setdefault(mode, []).append(r)
    rows = []
    base = min(results["none"], key=lambda r: r["step_s"]) if "none" in results else None
    for mode in MODES:
        if mode not in results:
            continue
        fast = min(results[mode], key=lambda r: r["step_s"])
        mem = min(r["activation_mb"] for r in results[mode])
        rows.append([mode, f"{fast['step_s']:.3f}", f"{fast['step_s'] / base['step_s']:.2f}x" if base else "n/a",
                     f"{mem:,.0f}", f"{fast['estimate_mb']:,.0f}"])
    first = next(iter(results.values()))[0] if results else {}
    print(f"Activation checkpointing, preset {args.config}, {first.get('tokens', '?')} tokens per step, "
          f"device {first.get('device', '?')}; fastest of {args.steps} steps, best of {args.repeats} processes")
    print(table(["mode", "s/step", "vs none", "activations MB (measured)", "activations MB (estimate)"], rows))


if __name__ == "__main__":
    main()
