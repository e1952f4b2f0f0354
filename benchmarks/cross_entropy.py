"""Output projection + cross-entropy, forward+backward: the unfused form (full logits, fp32 copy,
`F.cross_entropy`) vs Blueberry's fused chunked `linear_cross_entropy` at several chunk sizes, eager and
under torch.compile, bf16 autocast where the device has it.

    python benchmarks/cross_entropy.py [--tokens 4096] [--d-model 256] [--vocab 8192]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from common import table, timed

from blueberry.ops import cross_entropy


def unfused(h, w, t):
    return F.cross_entropy((h @ w.t()).float(), t)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    h = torch.randn(args.tokens, args.d_model, device=device, requires_grad=True)
    w = (torch.randn(args.vocab, args.d_model, device=device) * 0.05).requires_grad_()
    targets = torch.randint(0, args.vocab, (args.tokens,), device=device)
    auto_chunk = cross_entropy.chunk_rows(args.vocab, device)

    def run(fn):
        def step():
            with torch.autocast(device, dtype=torch.bfloat16):
                loss = fn(h, w, targets)
            loss.backward()
            if device == "cuda":
                torch.cuda.synchronize()
        return step

    rows = []
    for compiled in (False, True):
        torch._dynamo.reset()
        base = timed(run(torch.compile(unfused) if compiled else unfused), repeats=args.repeats)
        rows.append(["compiled" if compiled else "eager", "unfused", f"{base * 1e3:.1f}", "1.00x"])
        for chunk in sorted({auto_chunk // 2, auto_chunk, auto_chunk * 4}):
            torch._dynamo.reset()
            original = cross_entropy.chunk_rows
            cross_entropy.chunk_rows = lambda vocab, device_type, c=chunk: c
            fn = cross_entropy.linear_cross_entropy
            sec = timed(run(torch.compile(fn) if compiled else fn), repeats=args.repeats)
            cross_entropy.chunk_rows = original
            label = f"fused, {chunk}-token chunks" + (" (default)" if chunk == auto_chunk else "")
            rows.append(["compiled" if compiled else "eager", label, f"{sec * 1e3:.1f}", f"{base / sec:.2f}x"])
    print(f"linear + cross-entropy fwd+bwd, {args.tokens} tokens, d_model {args.d_model}, vocab {args.vocab}, "
          f"bf16 autocast, device {device}")
    print(table(["mode", "implementation", "ms", "speed-up"], rows))


if __name__ == "__main__":
    main()
