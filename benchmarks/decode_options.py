"""The compiled decode step under each set of inductor options, side by side: what each of
`Capabilities.decode_compile_options` buys, and the same options given to `torch.compile(options=...)`
instead of held while dynamo traces (as the engine does).

    python benchmarks/decode_options.py [--run RUN] [--config cpu] [--batch 1] [--new-tokens 128]

Weights: a trained run (`--run`) or random ones at the preset's dense shapes. tokens/s of greedy decoding
after a 32-token prompt, the best of 3 after the untimed compiling call; "same" counts the tokens equal to
the eager engine's. Each set compiles anew (tens of seconds each on a CPU).
"""

from __future__ import annotations

import argparse
import copy

from common import table, timed
from decode_speed import prompts_for, random_weights, trained_weights

TEMPLATES = {"max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN"}
OPTION_SETS = {
    "none": {},
    "freezing": {"freezing": True},
    "freezing + cpp_wrapper": {"freezing": True, "cpp_wrapper": True},
    "freezing + cpp_wrapper + C++ GEMM templates": {"freezing": True, "cpp_wrapper": True, **TEMPLATES},
}


def engine_with(model, tokenizer, options: dict | None, given_to_compile: bool, slots: int):
    import torch

    from blueberry.inference import Engine
    from blueberry.system.capabilities import Capabilities

    if options is None:
        return Engine(model, tokenizer, slots=slots)
    torch._dynamo.reset()  # a graph compiled for the previous set (weights as inputs) would fit this engine too
    held = {} if given_to_compile else options
    original = Capabilities.decode_compile_options
    Capabilities.decode_compile_options = lambda self, experts=False: held
    try:
        engine = Engine(model, tokenizer, slots=slots, compile=True)
    finally:
        Capabilities.decode_compile_options = original
    if given_to_compile:
        engine._decode = torch.compile(engine._decode_logits, dynamic=False, options=options)
    return engine


def main() -> None:
    from blueberry.inference import SamplingParams

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run")
    p.add_argument("--config", default="cpu")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--new-tokens", type=int, default=128)
    args = p.parse_args()
    model, tokenizer = trained_weights(args.run) if args.run else random_weights("standard", args.config)
    prompts = prompts_for(model, tokenizer, args.run is not None, args.batch, 32)
    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=0, stop_at_eot=False)
    variants = {"eager": (None, False), **{name: (o, False) for name, o in OPTION_SETS.items()},
                "all, as torch.compile(options=)": (OPTION_SETS["freezing + cpp_wrapper + C++ GEMM templates"], True)}
    rows, reference = [], None
    for name, (options, given) in variants.items():
        engine = engine_with(copy.deepcopy(model), tokenizer, options, given, args.batch)
        run = lambda: engine.generate(prompts, params)[0].output_ids  # noqa: E731
        tokens = run()
        reference = reference or tokens
        seconds = timed(run, warmup=0, repeats=3, stat="min")
        rows.append([name, f"{args.batch * args.new_tokens / seconds:,.0f}",
                     f"{sum(a == b for a, b in zip(tokens, reference))}/{args.new_tokens}"])
        print(table(["inductor options", "tokens/s", "same"], rows[-1:]), flush=True)
    print("\n" + table(["inductor options", "tokens/s", "same"], rows))


if __name__ == "__main__":
    main()
