"""Decode speed: Blueberry's engine vs Hugging Face `generate()` on the same weights, side by side.

    python benchmarks/decode_speed.py [--config cpu] [--new-tokens 128] [--prompt-tokens 32] [--repeats 3]

For each model (dense, MoE at the preset's shapes, random weights: speed does not depend on what the
weights learned), precision (fp32, bf16 weights) and batch (1, 8): tokens/s of
  blueberry           Engine, eager decode step
  blueberry-compiled  Engine with the compiled fixed-shape decode step (compiled in the untimed warm-up)
  blueberry-int8      Engine on the int8 weight-only model (fp32/bf16 activations)
  hf                  transformers generate() on the exported model (its default cache), greedy,
                      min_new_tokens = max_new_tokens so that both produce exactly the same count
Every variant generates `--new-tokens` tokens greedily after the same random prompts (end-of-text does
not stop it). tokens/s = batch * new tokens / the fastest of `--repeats` timed runs after one warm-up.
Weight memory: the bytes of weights a decode step reads (int8 row: int8 weights plus fp32 scales).
"""

from __future__ import annotations

import argparse
import copy
import tempfile

from common import table, timed


def build(model_type: str, preset: str):
    import torch

    from blueberry.configs import get_config
    from blueberry.models import create_model

    cfg = get_config(preset, model_type=model_type, device="cpu" if not torch.cuda.is_available() else None,
                     use_fp8=False, vocab_size=8192)
    torch.manual_seed(0)
    model = create_model(cfg).eval()
    return cfg, model


class _Tok:
    """The engine needs only the end-of-text id here (greedy, no stop strings, eot ignored)."""
    eot_id = 0

    @staticmethod
    def decode(ids):
        return ""


def ours(model, prompts, new_tokens: int, compile: bool):
    from blueberry.inference import Engine, SamplingParams

    engine = Engine(model, _Tok(), slots=len(prompts), compile=compile)
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0, stop_at_eot=False)
    return lambda: engine.generate(prompts, params)


def hf(model, prompts, new_tokens: int, dtype):
    import torch

    from blueberry.export.huggingface import to_hf_model

    hf_model = to_hf_model(model.float()).to(dtype).to(next(model.parameters()).device)
    ids = torch.tensor(prompts, device=next(hf_model.parameters()).device)

    def run():
        with torch.no_grad():
            hf_model.generate(ids, do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                              pad_token_id=0, eos_token_id=None)
    return run


def main() -> None:
    import torch

    from blueberry.inference.quantize import quantize_model, weight_bytes

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="cpu")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--models", default="standard,moe")
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--no-compile", action="store_true", help="skip the compiled variant (it compiles per shape)")
    args = p.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    rows = []
    for model_type in args.models.split(","):
        cfg, base = build(model_type, args.config)
        for dtype_name in args.dtypes.split(","):
            dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
            for batch in map(int, args.batches.split(",")):
                g = torch.Generator().manual_seed(batch)
                prompts = torch.randint(1, cfg.vocab_size, (batch, args.prompt_tokens), generator=g).tolist()
                plain = copy.deepcopy(base).to(dtype)
                int8 = quantize_model(copy.deepcopy(base), "int8").to(dtype)
                variants = {"blueberry": ours(plain, prompts, args.new_tokens, False),
                            "blueberry-int8": ours(int8, prompts, args.new_tokens, False),
                            "hf": hf(copy.deepcopy(base), prompts, args.new_tokens, dtype)}
                if not args.no_compile:
                    variants["blueberry-compiled"] = ours(copy.deepcopy(plain), prompts, args.new_tokens, True)
                memory = {"blueberry": weight_bytes(plain), "blueberry-compiled": weight_bytes(plain),
                          "blueberry-int8": weight_bytes(int8), "hf": weight_bytes(plain)}
                times = {name: timed(fn, warmup=1, repeats=args.repeats, stat="min") for name, fn in variants.items()}
                for name, seconds in times.items():
                    rate = batch * args.new_tokens / seconds
                    rows.append([model_type, dtype_name, batch, name, f"{rate:,.0f}",
                                 f"{times['hf'] / seconds:.2f}x", f"{memory[name] / 2**20:.1f}"])
                print(table(["model", "dtype", "batch", "variant", "tokens/s", "vs HF", "weights MiB"], rows[-len(times):]),
                      flush=True)
    print("\n" + table(["model", "dtype", "batch", "variant", "tokens/s", "vs HF", "weights MiB"], rows))


if __name__ == "__main__":
    tempfile.tempdir = tempfile.gettempdir()
    main()
