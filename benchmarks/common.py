"""Helpers shared by the benchmark scripts: timing with warm-up, and a markdown table."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# the package's progress lines (data, optimizers, plans) would interleave with the tables: warnings only
logging.getLogger("blueberry").setLevel(logging.WARNING)
sys.path.insert(0, str(ROOT))


def timed(fn, warmup: int = 2, repeats: int = 5, stat: str = "median") -> float:
    """Median (or "min") seconds of `fn()` after `warmup` untimed calls. The minimum suits a shared
    machine whose neighbours only ever slow a call down."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[0] if stat == "min" else times[len(times) // 2]


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
