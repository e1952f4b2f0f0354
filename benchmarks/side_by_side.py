"""Why `--ensemble` trains its members side by side on a CPU: the compiled training step of the CPU recipe
(forward, backward, Muon hybrid; bf16 autocast where the CPU has it; random tokens) timed in one process
using every core, then in one process per core at the same time (each pinned, as ensemble members are).

    python benchmarks/side_by_side.py [--steps 10]

Reported: seconds per step of each process and member-steps per second of the whole machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from common import ROOT, table


def step_time(steps: int) -> float:
    """Mean seconds of a compiled training step of the CPU recipe, in this process (after warm-up)."""
    import torch

    from blueberry.configs import get_config
    from blueberry.models import create_model
    from blueberry.optimizers import setup_optimizers
    from blueberry.system import set_cpu_threads
    from blueberry.training.precision import choose_precision

    set_cpu_threads()
    config = get_config("cpu", ensemble=1)
    model = create_model(config)
    optimizers = setup_optimizers(model, config)
    precision = choose_precision(config, config.capabilities())
    compiled = torch.compile(model)
    x = torch.randint(0, config.vocab_size, (config.batch_size, config.max_seq_len))
    y = torch.randint(0, config.vocab_size, (config.batch_size, config.max_seq_len))

    def step():
        with precision.autocast():
            loss = compiled(x, y).loss
        loss.backward()
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
    for _ in range(5):
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - t0) / steps


def launch(cores: list[int], steps: int, setup: str = "") -> subprocess.Popen:
    """`step_time(steps)` in a new process pinned to `cores`, after running the Python line `setup`."""
    code = ("import os, sys; os.sched_setaffinity(0, [int(c) for c in sys.argv[1].split(',')]); "
            "sys.path.insert(0, sys.argv[3])\n" + setup + "\nfrom side_by_side import step_time; "
            "print(step_time(int(sys.argv[2])))")
    return subprocess.Popen([sys.executable, "-c", code, ",".join(map(str, cores)), str(steps),
                             str(ROOT / "benchmarks")], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(len(cores))})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    cores = sorted(os.sched_getaffinity(0))
    one = float(launch(cores, args.steps).communicate()[0].split()[-1])
    procs = [launch([c], args.steps) for c in cores]  # all at once
    each = [float(p.communicate()[0].split()[-1]) for p in procs]
    rows = [[f"1 process, {len(cores)} threads", f"{one:.3f}", f"{1 / one:.2f}"],
            [f"{len(cores)} processes, 1 core each", " / ".join(f"{t:.3f}" for t in each),
             f"{sum(1 / t for t in each):.2f}"]]
    print(table(["layout", "s per step (each process)", "member-steps per second"], rows))
    print(json.dumps({"one_process": one, "per_core": each}))


if __name__ == "__main__":
    main()
