"""Expert parallelism's dispatch: rows and bytes each rank exchanges per training step, and the time.

    python benchmarks/expert_parallel.py [--nproc 2] [--parallel ddp|fsdp] [--d-model 256] [--n-layers 4]
                                          [--experts 8] [--top-k 2] [--batch 4] [--seq 256] [--steps 6]

One torchrun job (gloo, CPU) trains a MoE model a few steps two ways, alternating, each rank its own batch,
the model under DDP or FSDP2 (`--parallel`):
  ddp / fsdp        every rank holds every expert (FSDP2: its shard of each)
  ddp+ep / fsdp+ep  --expert-parallel NPROC: each rank holds experts / NPROC and exchanges tokens with
                    all_to_all_single; the rest of the model under DDP / FSDP2
Per step (the median after one warm-up step): seconds, the forward exchanges' seconds (counts, rows there and
back; the backward's two exchanges mirror them), rows each rank sends to the others in the forward (there and
back) and their MB with the backward's (fp32 rows of d_model, twice the forward's).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

from common import ROOT, table


def _worker(args) -> None:
    import torch
    import torch.distributed as dist

    from blueberry.configs import AdaptiveMoEModelConfig
    from blueberry.models import create_model
    from blueberry.optimizers import setup_optimizers
    from blueberry.training.distributed import init_distributed, teardown, wrap_model
    from blueberry.training.expert_parallel import apply_expert_parallel

    ctx = init_distributed("cpu")
    torch.set_num_threads(1)
    config = AdaptiveMoEModelConfig(device="cpu", model_type="moe", d_model=args.d_model, n_layers=args.n_layers,
                                    n_heads=max(1, args.d_model // 64), num_experts=args.experts, expert_top_k=args.top_k,
                                    vocab_size=4096, max_seq_len=args.seq, batch_size=args.batch)
    results = {}
    for variant in [args.parallel, f"{args.parallel}+ep"] * 2:
        torch.manual_seed(0)
        model = create_model(config)
        ep = apply_expert_parallel(model, ctx.world_size) if variant.endswith("+ep") else None
        wrapped = wrap_model(model, ctx, args.parallel)
        optimizers = setup_optimizers(model, config, distributed=True)
        params = [p for p in model.parameters() if p.requires_grad]
        generator = torch.Generator().manual_seed(ctx.rank)
        for step in range(args.steps):
            x = torch.randint(0, 4096, (args.batch, args.seq), generator=generator)
            if ep is not None:
                ep.stats.clear()
            t0 = time.perf_counter()
            wrapped(x, x).loss.backward()
            if ep is not None:
                ep.sync_and_clip(params, 1.0)
            else:
                torch.nn.utils.clip_grad_norm_(params, 1.0)
            for opt in optimizers:
                opt.step()
                opt.zero_grad(set_to_none=True)
            dist.barrier()
            if step > 0:
                stats = dict(ep.stats) if ep is not None else {"rows_sent": 0, "exchange_s": 0.0}
                results.setdefault(variant, []).append((time.perf_counter() - t0, stats))
        del wrapped
    if ctx.is_main:
        rows = []
        for variant, samples in results.items():
            sent = statistics.median(s["rows_sent"] for _, s in samples)
            rows.append([variant, f"{statistics.median(t for t, _ in samples):.3f}",
                         f"{statistics.median(s['exchange_s'] for _, s in samples):.3f}", f"{sent:,.0f}",
                         f"{sent * args.d_model * 4 * 2 / 1e6:.2f}"])
        print(f"{ctx.world_size} processes, d_model {args.d_model}, {args.n_layers} layers, {args.experts} experts, "
              f"top-{args.top_k}, {args.batch} x {args.seq} tokens per rank per step")
        print(table(["variant", "step s", "fwd exchange s", "rows sent/step (fwd)", "MB sent/step (fwd+bwd)"], rows))
    teardown(ctx)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--parallel", choices=("ddp", "fsdp"), default="ddp")
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--n-layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(args)
        return
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc), "--master_addr",
           "127.0.0.1", "--master_port", "29611", __file__, "--worker", *sys.argv[1:]]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    sys.exit(subprocess.run(cmd, env=env, cwd=ROOT).returncode)


if __name__ == "__main__":
    main()
