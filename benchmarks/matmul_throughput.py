"""Matrix-multiply throughput by dtype at the model's shapes (why bf16 autocast on AMX CPUs).

    python benchmarks/matmul_throughput.py
"""

from __future__ import annotations

import torch
from common import table, timed

from blueberry.system import set_cpu_threads

SHAPES = [(4096, 256, 1024), (1024, 256, 1024), (4096, 256, 8192), (4096, 1024, 4096)]


def main():
    set_cpu_threads()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    for m, k, n in SHAPES:
        row = [f"({m},{k},{n})"]
        for dtype in (torch.float32, torch.bfloat16):
            a = torch.randn(m, k, dtype=dtype, device=device)
            b = torch.randn(k, n, dtype=dtype, device=device)
            sec = timed(lambda: a @ b, warmup=3, repeats=10)
            row.append(f"{2 * m * k * n / sec / 1e9:,.0f}")
        rows.append(row)
    print(f"{device}, {torch.get_num_threads()} threads; GFLOP/s")
    print(table(["M,K,N", "fp32", "bf16"], rows))


if __name__ == "__main__":
    main()
