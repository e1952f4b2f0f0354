"""Causal attention on a CPU in bf16: PyTorch's SDPA (a flash kernel) vs `ops.attention`'s matmul form, at the
CPU recipe's shapes.

    python benchmarks/attention_cpu.py [--steps 10]

1. Attention alone, forward + backward, one core: milliseconds, and each form's largest error against a
   float64 reference on the same bf16 inputs (outputs and the gradient of q).
2. The compiled training step of the CPU recipe (`side_by_side.step_time`), the two forms side by side, one
   process pinned to each core as ensemble members are, run twice with the cores swapped; seconds per step.
"""

from __future__ import annotations

import argparse
import os
import time

from common import table
from side_by_side import launch

SDPA_ONLY = "import blueberry.ops.attention as a; a.MATMUL_FORM_MAX_SEQ = 0"  # the matmul form never taken


def attention_alone(repeats: int = 5) -> list[list]:
    import torch
    import torch.nn.functional as F

    import blueberry.ops.attention as ops_attention
    from blueberry.configs import get_config

    torch.set_num_threads(1)
    cfg = get_config("cpu")
    heads, seq = cfg.n_heads, cfg.max_seq_len
    dim = cfg.d_model // heads
    torch.manual_seed(0)
    q, k, v = (torch.randn(cfg.batch_size, heads, seq, dim) for _ in range(3))
    ref_q = q.double().requires_grad_()
    ref = F.scaled_dot_product_attention(ref_q, k.double(), v.double(), is_causal=True)
    ref.sum().backward()
    rows = []
    for name, limit in (("SDPA", 0), ("matmul form", ops_attention.MATMUL_FORM_MAX_SEQ)):
        ops_attention.MATMUL_FORM_MAX_SEQ = limit
        qb, kb, vb = (t.bfloat16().requires_grad_() for t in (q, k, v))
        times = []
        for i in range(2 + repeats):
            for t in (qb, kb, vb):
                t.grad = None
            t0 = time.perf_counter()
            out = ops_attention.causal_attention(qb, kb, vb)
            out.float().sum().backward()
            if i >= 2:
                times.append(time.perf_counter() - t0)
        rows.append([name, f"{sorted(times)[len(times) // 2] * 1e3:.1f}",
                     f"{(out.double() - ref).abs().max().item():.4f}",
                     f"{(qb.grad.double() - ref_q.grad).abs().max().item():.4f}"])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    print(table(["form", "fwd+bwd ms", "max |out - float64|", "max |dq - float64|"], attention_alone()))
    cores = sorted(os.sched_getaffinity(0))[:2]
    if len(cores) < 2:
        return
    times: dict[str, list[float]] = {"SDPA": [], "matmul form": []}
    for order in (("SDPA", "matmul form"), ("matmul form", "SDPA")):
        procs = {form: launch([core], args.steps, SDPA_ONLY if form == "SDPA" else "")
                 for form, core in zip(order, cores)}
        for form, proc in procs.items():
            times[form].append(float(proc.communicate()[0].split()[-1]))
    rows = [[form, " / ".join(f"{t:.3f}" for t in ts), f"{sum(ts) / len(ts):.3f}"] for form, ts in times.items()]
    print(table(["form", "s per training step (core swapped)", "mean"], rows))


if __name__ == "__main__":
    main()
