"""Architectures side by side: dense, MoE, Mixture-of-Depths, Mamba-2, a hybrid and retention.

    python benchmarks/architectures.py [--minutes 8] [--archs dense,moe,...] [--out-root /tmp/arch]

Training: each architecture trains from `train.py` on the default corpus (Shakespeare, default CPU
preset shapes, the default optimizer and schedule) for the same wall-clock budget. The number of steps
that fits the budget is measured first: a short calibration run (same flags, compiled) gives the
median step time after compilation, and the real run gets floor(budget / step time) steps, so that
its schedule decays to the end as usual. Reported: bits per byte on the validation split at the end,
training tokens/s, total and active parameters, peak memory of the training process (max RSS), and
the run's actual wall time.

Generation: each architecture with random weights at the same shapes (speed does not depend on what the
weights learned), batch 1, eager: the prompt of 512 or 2,048 tokens is prefilled, then 64 tokens are
decoded one at a time; tokens/s of the decode steps. The cache is sized to prompt + 64 tokens, as a
model whose context is that long would have: attention reads a KV cache that grows with the context,
Mamba-2 and retention a fixed-size state.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import ROOT, table

ARCHS = {  # name: the flags that make it (everything else: the CPU preset's defaults)
    "dense": ["--model-type", "standard"],
    "moe": ["--model-type", "moe"],
    "mod": ["--layers", "attn:moe,mod(attn:moe)"],
    "mamba": ["--layers", "mamba:mlp"],
    "hybrid": ["--layers", "mamba:mlp,mamba:mlp,mamba:mlp,attn:mlp"],
    "retention": ["--layers", "retention:mlp"],
}


def train(flags: list[str], out_dir: Path) -> tuple[dict, float, float]:
    """Run train.py; (summary.json, max RSS in GB, wall seconds)."""
    cmd = ["/usr/bin/time", "-f", "MAXRSS_KB %M", sys.executable, "train.py", *flags, "--out-dir", str(out_dir)]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(flags)} failed:\n{r.stderr[-3000:]}")
    rss_kb = int(re.findall(r"MAXRSS_KB (\d+)", r.stderr)[-1])
    return json.loads((out_dir / "summary.json").read_text()), rss_kb / 2**20, wall


def step_seconds(run_dir: Path) -> float:
    """Median step time after the first few (compilation) steps."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    times = [r["step_time"] for r in rows if r.get("kind") == "train" and "step_time" in r]
    return statistics.median(times[len(times) // 2:])


def parameters(run_dir: Path) -> tuple[int, int]:
    import torch

    from blueberry.configs import AdaptiveMoEModelConfig
    from blueberry.models import create_model

    cfg = AdaptiveMoEModelConfig.from_dict(json.loads((run_dir / "config.json").read_text()))
    with torch.device("meta"):
        rep = create_model(cfg).parameter_report()
    return rep["total"], rep["active_per_token"]


def decode_speed(flags: list[str], context: int, new_tokens: int = 64) -> float:
    import torch

    from blueberry.cli.args import add_train_flags, overrides_from
    from blueberry.configs import get_config
    from blueberry.models import create_model

    parser = argparse.ArgumentParser()
    add_train_flags(parser)  # the same flags as training, on the preset train.py picks here
    overrides = overrides_from(parser.parse_args(flags))
    cfg = get_config("default", **{**overrides, "device": "cpu", "max_seq_len": context + new_tokens,
                                   "use_fp8": False}).validate()
    torch.manual_seed(0)
    model = create_model(cfg).eval().fuse_projections()
    prompt = torch.randint(0, cfg.vocab_size, (1, context))
    with torch.no_grad():
        best = float("inf")
        for _ in range(2):
            caches = model.new_kv_caches(1, max_len=context + new_tokens)
            logits = model(prompt, kv_caches=caches, positions=torch.arange(context)[None], last_only=True).logits
            token = logits[:, -1].argmax(-1, keepdim=True)
            t0 = time.perf_counter()
            for i in range(new_tokens):
                logits = model(token, kv_caches=caches, positions=torch.tensor([[context + i]])).logits
                token = logits[:, -1].argmax(-1, keepdim=True)
            best = min(best, time.perf_counter() - t0)
    return new_tokens / best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=8.0, help="training budget per architecture")
    ap.add_argument("--archs", default=",".join(ARCHS))
    ap.add_argument("--out-root", type=Path, default=Path("/tmp/arch"))
    ap.add_argument("--skip-training", action="store_true", help="only the generation speeds")
    ap.add_argument("--reuse", action="store_true", help="keep the finished training runs under --out-root")
    args = ap.parse_args()
    archs = args.archs.split(",")
    rows = []
    for name in archs:
        flags = ARCHS[name]
        row = [name]
        if not args.skip_training:
            out = args.out_root / name
            if args.reuse and (out / "summary.json").exists():  # a finished run of an earlier invocation
                summary = json.loads((out / "summary.json").read_text())
                done = json.loads((out / "bench.json").read_text()) if (out / "bench.json").exists() else {}
                rss, wall = done.get("rss_gb"), done.get("wall_s")
            else:
                calib = args.out_root / f"{name}-calibrate"
                train([*flags, "--max-steps", "16", "--compile", "--eval-every", "1000", "--checkpoint-every", "1000"],
                      calib)
                steps = int(args.minutes * 60 / step_seconds(calib))
                summary, rss, wall = train([*flags, "--max-steps", str(steps)], out)
                (out / "bench.json").write_text(json.dumps({"rss_gb": rss, "wall_s": wall}))
            total, active = parameters(out)
            row += [summary["step"], f"{summary['bits_per_byte']:.4f}", f"{summary['train_tokens_per_sec']:,.0f}",
                    f"{total / 1e6:.1f}M / {active / 1e6:.1f}M", "n/a" if rss is None else f"{rss:.2f}",
                    "n/a" if wall is None else f"{wall / 60:.1f}"]
        row += [f"{decode_speed(flags, ctx):.0f}" for ctx in (512, 2048)]
        rows.append(row)
        print(" | ".join(map(str, row)), flush=True)
    header = ["architecture"]
    if not args.skip_training:
        header += ["steps", "val bits/byte", "train tok/s", "params total / active", "peak RSS GB", "wall min"]
    header += ["decode tok/s @512", "decode tok/s @2048"]
    print(table(header, rows))


if __name__ == "__main__":
    main()
