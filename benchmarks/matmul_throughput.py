"""Matrix-multiply throughput by dtype at the model's shapes (why bf16 autocast on AMX CPUs), and the
cost of a new row count every call (why the MoE pads expert groups to multiples of 64 on CPU: oneDNN
compiles a bf16 kernel per shape).

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
    print(varying_rows_table(device))


def varying_rows_table(device: str, calls: int = 40) -> str:
    """Median ms of (M, 256) x (256, 1024) over `calls` calls: M fixed, M new each call, M new but
    rounded up to a multiple of 64 (as the MoE's aligned expert groups are)."""
    gen = torch.Generator().manual_seed(0)
    new = [int(m) for m in torch.randint(900, 1600, (calls,), generator=gen)]
    cases = {"same M every call": [1500] * calls, "new M every call": new,
             "new M rounded up to 64": [(m + 63) // 64 * 64 for m in new]}
    rows = []
    for name, ms in cases.items():
        row = [name]
        for dtype in (torch.float32, torch.bfloat16):
            a = torch.randn(max(ms), 256, dtype=dtype, device=device)
            b = torch.randn(256, 1024, dtype=dtype, device=device)
            times = []
            for m in ms:
                times.append(timed(lambda: a[:m] @ b, warmup=0, repeats=1))
            row.append(f"{sorted(times)[len(times) // 2] * 1e3:.2f}")
        rows.append(row)
    return table(["rows per call", "fp32 ms", "bf16 ms"], rows)


if __name__ == "__main__":
    main()
