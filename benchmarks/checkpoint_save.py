"""Checkpoint save under FSDP2: sharded (DCP, every rank its shards) vs the full gather to rank 0 (before #29).

    python benchmarks/checkpoint_save.py [--d-model 768] [--n-layers 12] [--vocab 32768] [--repeats 2]
                                         [--methods gather,dcp,dcp-async]

Each save runs in a torchrun job of its own (2 processes, gloo, CPU): the allocator keeps what a save freed,
so only a process's first save shows what saving costs in memory. The job builds the model (standard
transformer, ~110M parameters at the defaults), shards it with FSDP2, takes one optimizer step (Muon + AdamW:
their states exist), then saves once, timed:
  gather      gathered_states (full model and optimizer states onto rank 0, cpu-offloaded), rank 0 writes
              model.safetensors + state.pt (what training/trainer.py did under FSDP2 before sharded checkpoints);
              rank 1 goes on once its part of the gather is sent, but its next collective waits for rank 0
  dcp         ShardedCheckpointer.save: every rank writes its own shards, rank 0 commits
  dcp-async   the same with asynchronous=True: `stall` is until save() returns (the training can go on),
              `committed` until the background write is done and committed
Per rank: seconds, resident memory before the save, its peak during the save (sampled every 2 ms from
/proc/self/statm; the rise is what the save costs) and the process's high-water mark (getrusage, the
training step included). Methods alternate over `--repeats` jobs; the table shows each rank's fastest
save and its largest rise.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import ROOT, table

METHODS = ("gather", "dcp", "dcp-async")


class PeakRSS:
    """Peak resident memory of this process while the block runs (a thread samples /proc/self/statm)."""

    def __enter__(self):
        self.peak, self._stop = rss_mb(), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_mb())
            time.sleep(0.002)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mb())


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def build(args, ctx):
    import torch

    from blueberry.configs import AdaptiveMoEModelConfig
    from blueberry.models import create_model
    from blueberry.optimizers import setup_optimizers
    from blueberry.training.distributed import wrap_model

    cfg = AdaptiveMoEModelConfig(model_type="standard", d_model=args.d_model, n_layers=args.n_layers,
                                 n_heads=args.d_model // 64, vocab_size=args.vocab, max_seq_len=64, batch_size=1,
                                 device="cpu", use_fp8=False, use_amp=False, parallel="fsdp", max_steps=10,
                                 out_dir=args.out).validate()
    torch.manual_seed(0)
    model = create_model(cfg)
    params = model.parameter_report()["total"]
    wrap_model(model, ctx, "fsdp")
    optimizers = setup_optimizers(model, cfg, distributed=True)
    x = torch.randint(0, cfg.vocab_size, (1, 64))
    model(x, x).loss.backward()
    for opt in optimizers:
        opt.step()
        opt.zero_grad(set_to_none=True)
    return cfg, model, optimizers, params


def save_once(method: str, cfg, model, optimizers, ctx, step: int) -> tuple[float, float]:
    """(seconds until the training could go on, seconds until the checkpoint is committed) on this rank."""
    from blueberry.runs.checkpoint import save_checkpoint
    from blueberry.training.distributed import gathered_states
    from blueberry.training.sharded_checkpoint import ShardedCheckpointer

    t0 = time.perf_counter()
    if method == "gather":
        weights, optim_states = gathered_states(model, optimizers)
        if cfg.tie_embeddings:  # stored once, as the trainer did
            weights.pop("lm_head.weight", None)
        if ctx.is_main:
            save_checkpoint(cfg.out_dir, step, weights, {"optimizers": optim_states}, keep=1)
        del weights, optim_states
        return (time.perf_counter() - t0,) * 2
    saver = ShardedCheckpointer(cfg.out_dir, ctx, asynchronous=method == "dcp-async")
    saver.save(step, model, optimizers, {"config": cfg.to_dict()}, keep=1)
    stall = time.perf_counter() - t0
    saver.wait()
    return stall, time.perf_counter() - t0


def worker(args) -> None:
    from blueberry.training.distributed import exit_process, init_distributed, teardown

    ctx = init_distributed("cpu")
    cfg, model, optimizers, params = build(args, ctx)
    ctx.barrier()
    gc.collect()
    before = rss_mb()
    with PeakRSS() as peak:
        stall, committed = save_once(args.worker, cfg, model, optimizers, ctx, 1)
    ctx.barrier()
    ckpt = max((Path(cfg.out_dir) / "checkpoints").glob("step_000001*"))
    written = sum(f.stat().st_size for f in ckpt.iterdir()) if ctx.is_main else 0
    result = {"method": args.worker, "rank": ctx.rank, "params": params, "stall_s": stall, "committed_s": committed,
              "rss_before_mb": before, "peak_mb": peak.peak, "written_mb": written / 2**20,
              "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    (Path(args.out) / f"result_{ctx.rank}.json").write_text(json.dumps(result))
    del model, optimizers
    teardown(ctx)
    exit_process(0)


def run_method(method: str, args) -> list[dict]:
    out = Path(tempfile.mkdtemp(prefix=f"ckpt-bench-{method}-"))
    try:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(29500 + os.getpid() % 1000), __file__, "--worker", method, "--out", str(out),
               "--d-model", str(args.d_model), "--n-layers", str(args.n_layers), "--vocab", str(args.vocab)]
        env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=1800)
        if r.returncode != 0:
            raise SystemExit(f"{method} failed:\n{r.stderr[-3000:]}")
        return [json.loads(f.read_text()) for f in sorted(out.glob("result_*.json"))]
    finally:
        shutil.rmtree(out, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d-model", type=int, default=768)
    p.add_argument("--n-layers", type=int, default=12)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    methods = args.methods.split(",")
    results = [r for _ in range(args.repeats) for m in methods for r in run_method(m, args)]
    rows = []
    for method in methods:
        for rank in (0, 1):
            mine = [r for r in results if r["method"] == method and r["rank"] == rank]
            fast = min(mine, key=lambda r: r["committed_s"])
            big = max(mine, key=lambda r: r["peak_mb"] - r["rss_before_mb"])
            rows.append([method, rank, f"{fast['stall_s']:.2f}", f"{fast['committed_s']:.2f}",
                         f"{big['rss_before_mb']:,.0f}", f"{big['peak_mb']:,.0f}",
                         f"+{big['peak_mb'] - big['rss_before_mb']:,.0f}", f"{max(r['maxrss_mb'] for r in mine):,.0f}",
                         f"{fast['written_mb']:,.0f}" if rank == 0 else ""])
    params = results[0]["params"]
    print(f"{params:,} parameters, 2 processes (gloo, CPU), FSDP2, Muon + AdamW states")
    print(table(["method", "rank", "stall s", "committed s", "RSS before MB", "peak during save MB", "rise MB",
                 "max RSS MB", "checkpoint MB"], rows))


if __name__ == "__main__":
    main()
