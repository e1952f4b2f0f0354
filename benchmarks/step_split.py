"""Where an eager engine step's time goes, by batch: the decode forward, the sampling and each token's
bookkeeping (stop checks, incremental detokenization), and the prefill of `batch` prompts in one forward
(what a burst of new requests costs before their first tokens), at 1 and 2 intra-op threads.

    python benchmarks/step_split.py --run RUN [--batches 1,4,16] [--threads 1,2] [--steps 60]

Sampled rows (temperature 0.8, each its own seed) of the run's own text; ms per step, the mean of `--steps`
steps after a few untimed ones; the prefill the best of 5 (the prompt is a 4-token `ROMEO:`-sized one).
"""

from __future__ import annotations

import argparse
import time

from common import table


def split_ms(engine, steps: int) -> dict:
    """Mean ms per step of the whole step and of its forward, sampling and per-token bookkeeping."""
    spent = {"forward": 0.0, "sampling": 0.0, "bookkeeping": 0.0}

    def timed(name, fn):
        def call(*args):
            start = time.perf_counter()
            try:
                return fn(*args)
            finally:
                spent[name] += time.perf_counter() - start
        return call

    engine._decode = timed("forward", engine._decode)
    engine._sample = timed("sampling", engine._sample)
    engine._advance = timed("bookkeeping", engine._advance)
    start = time.perf_counter()
    for _ in range(steps):
        engine.decode()
    whole = time.perf_counter() - start
    return {"step": whole / steps * 1e3, **{k: v / steps * 1e3 for k, v in spent.items()}}


def prefill_ms(model, tokenizer, batch: int, ids: list[int]) -> float:
    from blueberry.inference.engine import Engine, SamplingParams

    engine, best = Engine(model, tokenizer, slots=batch), float("inf")
    for _ in range(6):
        for i in range(batch):
            engine.submit(ids, SamplingParams(max_new_tokens=1, temperature=0.8, seed=i))
        start = time.perf_counter()
        engine.admit()
        best = min(best, time.perf_counter() - start)
        engine.run_until_done()
    return best * 1e3


def main() -> None:
    import torch

    from blueberry.inference.engine import Engine, SamplingParams
    from blueberry.runs.loading import load_model

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True)
    p.add_argument("--batches", default="1,4,16")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--steps", type=int, default=60)
    args = p.parse_args()
    model, _, tokenizer, _ = load_model(args.run, device="cpu")
    text = tokenizer.encode("def main():\n    return 1\n" * 8)
    rows = []
    for threads in map(int, args.threads.split(",")):
        torch.set_num_threads(threads)
        for batch in map(int, args.batches.split(",")):
            engine = Engine(model, tokenizer, slots=batch)
            for i in range(batch):
                engine.submit(text[i:i + 16], SamplingParams(max_new_tokens=args.steps + 10, temperature=0.8,
                                                             seed=i, stop_at_eot=False))
            for _ in range(5):
                engine.step()
            split = split_ms(engine, args.steps)
            rows.append([threads, batch, *(f"{split[k]:.2f}" for k in ("step", "forward", "sampling", "bookkeeping")),
                         f"{prefill_ms(model, tokenizer, batch, text[:4]):.1f}"])
    print(table(["threads", "batch", "decode step ms", "forward", "sampling", "bookkeeping",
                 "prefill of batch x 4 tokens ms"], rows))


if __name__ == "__main__":
    main()
