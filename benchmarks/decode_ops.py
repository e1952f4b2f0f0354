"""What one eager decode step of the engine runs: the ATen operations it dispatches (counted) and where its
CPU time goes (torch.profiler, the heaviest operators by self time).

    python benchmarks/decode_ops.py --run RUN [--batch 1] [--steps 32]

The engine decodes `--batch` greedy rows of the run's own text; the count is of one step after the prefill,
the profile of `--steps` steps.
"""

from __future__ import annotations

import argparse
from collections import Counter

from common import table


def main() -> None:
    import torch
    from torch.profiler import profile
    from torch.utils._python_dispatch import TorchDispatchMode

    from blueberry.inference.engine import Engine, SamplingParams
    from blueberry.runs.loading import load_model

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=32)
    args = p.parse_args()
    model, _, tokenizer, _ = load_model(args.run, device="cpu")
    engine = Engine(model, tokenizer, slots=args.batch)
    ids = [tokenizer.prefix_id] + tokenizer.encode("def main():\n    return 1\n" * 8)
    params = SamplingParams(max_new_tokens=args.steps + 3, temperature=0, stop_at_eot=False)
    for i in range(args.batch):
        engine.submit(ids[i:i + 32], params)
    engine.step()  # the prefill and a first step
    counts: Counter = Counter()

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            counts[str(func)] += 1
            return func(*args, **(kwargs or {}))

    with Count():
        engine.step()
    print(f"ATen operations in one decode step at batch {args.batch}: {sum(counts.values())}")
    print(table(["operation", "calls"], [[name, n] for name, n in counts.most_common(12)]))
    with profile() as prof:
        for _ in range(args.steps):
            engine.step()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    print(table(["operator", "self CPU share", "calls per step"],
                [[e.key, f"{e.self_cpu_time_total / total:.0%}", f"{e.count / args.steps:.0f}"] for e in events[:8]]))


if __name__ == "__main__":
    main()
