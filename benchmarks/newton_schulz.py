"""Muon's Newton-Schulz orthogonalisation for the cpu preset's matrices: the textbook form (one call per
matrix, X = aX + (bA + cA@A) @ X) vs Blueberry's (fused baddbmm, same-shape matrices stacked into one call).

    python benchmarks/newton_schulz.py
"""

from __future__ import annotations

import torch
from common import table, timed

from blueberry.optimizers import zeropower_via_newtonschulz5
from blueberry.optimizers.muon import NS_COEFFICIENTS


def textbook(G, steps=5, eps=1e-7, dtype=torch.bfloat16):
    a, b, c = NS_COEFFICIENTS
    X = G.to(dtype)
    transposed = X.size(-2) > X.size(-1)
    if transposed:
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + eps)
    for _ in range(steps):
        A = X @ X.mT
        X = a * X + (b * A + c * (A @ A)) @ X
    return X.mT if transposed else X


def main():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # (shape, how many per step) for the cpu preset: 4 layers of d_model 256; dense d_ff 704, MoE 8 experts
    # of d_ff 512 whose [gate; up] Muon orthogonalises as two matrices each
    cases = [((256, 256), 16, "attention q/k/v/o"), ((704, 256), 8, "dense gate/up"),
             ((256, 704), 4, "dense down"), ((8, 2, 512, 256), 4, "experts gate, up"), ((8, 256, 512), 4, "experts down")]
    rows = []
    for shape, count, what in cases:
        mats = [torch.randn(*shape, device=device) for _ in range(count)]
        old = timed(lambda: [textbook(m) for m in mats])
        fused = timed(lambda: [zeropower_via_newtonschulz5(m) for m in mats])
        stacked = timed(lambda: zeropower_via_newtonschulz5(torch.stack(mats)))
        rows.append([what, f"{count} x {tuple(shape)}", f"{old * 1e3:.1f}", f"{fused * 1e3:.1f}",
                     f"{stacked * 1e3:.1f}", f"{old / min(fused, stacked):.2f}x"])
    print(f"Newton-Schulz (5 steps, bf16), device {device}, {torch.get_num_threads()} threads; ms per optimizer step")
    print(table(["matrices", "count x shape", "textbook", "fused baddbmm", "fused + stacked", "best speed-up"], rows))


if __name__ == "__main__":
    main()
