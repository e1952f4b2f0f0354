"""Decode speed: Blueberry's engine vs Hugging Face `generate()` (and llama.cpp) on the same weights, side by side.

    python benchmarks/decode_speed.py [--run RUN] [--config cpu] [--new-tokens 128] [--prompt-tokens 32]
                                      [--repeats 5] [--llama-python PYTHON]

Weights: a trained run (`--run`, its own tokenizer and a prompt from its text) or, without it, random
weights at the preset's shapes for each of `--models` (speed does not depend on what the weights
learned; their small stand-in tokenizer decodes the ids beyond its vocabulary to nothing, so the engine's
detokenization costs less than on a trained run). For each precision (fp32, bf16 weights) and batch (1, 8), tokens/s of
  blueberry           Engine, eager decode step
  blueberry-compiled  Engine with the compiled fixed-shape decode step (the device's inductor options,
                      `Capabilities.decode_compile_options`; compiled in the untimed warm-up)
  blueberry-int8      Engine on the int8 weight-only model (fp32/bf16 activations)
  hf                  transformers generate() on the exported model (its default cache), greedy,
                      min_new_tokens = max_new_tokens so that both produce exactly the same count
  llama.cpp           llama-cpp-python on the run's GGUF export (f32 / bf16), batch 1, greedy, with --run;
                      run by this interpreter or by `--llama-python` (one that has llama-cpp-python)
Every variant generates `--new-tokens` tokens greedily after the same prompts (end-of-text does not stop
it); "same" counts the first sequence's tokens equal to transformers'. tokens/s = batch * new tokens /
the fastest of `--repeats` timed runs after one warm-up, the variants taking turns run by run (a slow
spell of a shared machine falls on all alike). floor: the tokens/s if a decode step only read its weights
once at the memory bandwidth measured here (a tensor far larger than the caches, summed).
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

from common import table, timed
from decode_variants import has_llama_cpp, hf_variant, llama_cpp_variant, memory_bandwidth, ours_variant

HEADER = ["weights", "dtype", "batch", "variant", "tokens/s", "vs HF", "same", "weights MiB", "floor tok/s"]


def random_weights(model_type: str, preset: str):
    import torch

    from blueberry.configs import get_config
    from blueberry.data.tokenizer import train_bpe
    from blueberry.models import create_model

    cfg = get_config(preset, model_type=model_type, device="cpu" if not torch.cuda.is_available() else None,
                     use_fp8=False, vocab_size=8192)
    torch.manual_seed(0)
    return create_model(cfg).eval(), train_bpe(["the quick brown fox jumps over the lazy dog\n"] * 50, 300)


def trained_weights(run: str):
    from blueberry.runs.loading import load_model

    model, _, tokenizer, _ = load_model(run, device="cpu")
    return model, tokenizer


def prompts_for(model, tokenizer, trained: bool, batch: int, length: int) -> list[list[int]]:
    import torch

    if trained:  # the run's own kind of text, shifted per row
        text = "def main():\n    \"\"\"Return the value of the first argument.\"\"\"\n" * 8
        ids = [tokenizer.prefix_id] + tokenizer.encode(text)
        return [ids[i:i + length] for i in range(batch)]
    g = torch.Generator().manual_seed(batch)
    return torch.randint(1, model.config.vocab_size, (batch, length), generator=g).tolist()


def measure(name, model, tokenizer, dtype_name, batch, args, bandwidth) -> list[list]:
    import torch

    from blueberry.ops.quantize import quantize_model, weight_bytes

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    prompts = prompts_for(model, tokenizer, args.run is not None, batch, args.prompt_tokens)
    plain = copy.deepcopy(model).to(dtype)
    int8 = quantize_model(copy.deepcopy(model), "int8").to(dtype)
    variants = {"blueberry": (ours_variant(plain, tokenizer, prompts, args.new_tokens, False), plain),
                "blueberry-int8": (ours_variant(int8, tokenizer, prompts, args.new_tokens, False), int8),
                "hf": (hf_variant(copy.deepcopy(model), prompts, args.new_tokens, dtype), plain)}
    if not args.no_compile:
        compiled = copy.deepcopy(plain)
        variants["blueberry-compiled"] = (ours_variant(compiled, tokenizer, prompts, args.new_tokens, True), compiled)
    if batch == 1 and args.llama_cpp and args.run and has_llama_cpp(args.llama_python):
        variants["llama.cpp"] = (llama_cpp_variant(model, tokenizer, prompts[0], args.new_tokens, dtype_name,
                                                   args.llama_python), plain)
    outputs = {variant: fn() for variant, (fn, _) in variants.items()}  # untimed warm-ups (and compilation)
    times = {variant: float("inf") for variant in variants}
    for _ in range(args.repeats):  # round robin: a slow spell of the machine falls on every variant alike
        for variant, (fn, _) in variants.items():
            times[variant] = min(times[variant], timed(fn, warmup=0, repeats=1, stat="min"))
    rows = []
    for variant, seconds in times.items():
        nbytes = weight_bytes(variants[variant][1])
        same = sum(a == b for a, b in zip(outputs[variant], outputs["hf"]))
        rows.append([name, dtype_name, batch, variant, f"{batch * args.new_tokens / seconds:,.0f}",
                     f"{times['hf'] / seconds:.2f}x", f"{same}/{args.new_tokens}", f"{nbytes / 2**20:.1f}",
                     f"{batch * bandwidth / nbytes:,.0f}"])
    return rows


def main() -> None:
    import torch

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", help="a trained run directory (default: random weights at --config's shapes)")
    p.add_argument("--config", default="cpu")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--models", default="standard,moe", help="model types of the random weights")
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--no-compile", action="store_true", help="skip the compiled variant (it compiles per shape)")
    p.add_argument("--no-llama-cpp", dest="llama_cpp", action="store_false", help="skip llama.cpp")
    p.add_argument("--llama-python", help="a Python interpreter with llama-cpp-python, when this one has none")
    args = p.parse_args()
    bandwidth = memory_bandwidth()
    print(f"memory bandwidth (sum of 512 MiB, {torch.get_num_threads()} threads): {bandwidth / 1e9:.1f} GB/s")
    weights = ([(Path(args.run).name, *trained_weights(args.run))] if args.run else
               [(f"random {t}", *random_weights(t, args.config)) for t in args.models.split(",")])
    rows = []
    for name, model, tokenizer in weights:
        for dtype_name in args.dtypes.split(","):
            for batch in map(int, args.batches.split(",")):
                new = measure(name, model, tokenizer, dtype_name, batch, args, bandwidth)
                rows += new
                print(table(HEADER, new), flush=True)
    print("\n" + table(HEADER, rows))


if __name__ == "__main__":
    tempfile.tempdir = tempfile.gettempdir()
    main()
