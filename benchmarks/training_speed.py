"""Training throughput: "standard PyTorch" vs Blueberry's adaptive settings vs Hugging Face, same shapes.

    python benchmarks/training_speed.py [--config cpu] [--steps 5] [--repeats 2] [--models moe,standard]

Variants (each run in its own process, alternated in an order rotated every repeat, so peak memory is
per variant; a variant's time is its fastest timed step and the best of its processes, because on a
shared machine neighbours only ever slow a step down):
  pytorch-fp32     our model in fp32 eager with unfused AdamW (foreach=False, fused=False)
  blueberry        our model with the detected settings (bf16 autocast on AMX/bf16 hardware, FP8 where
                   supported — applied with training/float8.py as a run applies it; before #31 this
                   variant never applied it — Muon hybrid optimizer with fused AdamW)
  blueberry-adamw  as above but fused AdamW for every parameter (same optimizer as the HF variant)
  blueberry-nofp8  as blueberry with --no-fp8 (on FP8 GPUs: the bf16 baseline of the FP8 speed-up)
  hf               transformers LlamaForCausalLM (dense) / MixtralForCausalLM (MoE) at the same shapes, SDPA
                   attention, bf16 autocast where the hardware has it, fused AdamW
  hf-compiled      hf under torch.compile
  hf-loop          (MoE only) hf with experts_implementation="eager": its loop over the experts instead of
                   the default grouped_mm (the "best HF" column takes the fastest HF variant)
The Blueberry variants use torch.compile when the config does (the default for runs of >= 150 steps);
compilation happens in the untimed warm-up steps.
MFU = (6 * active non-embedding params + 12 * layers * d_model * seq) * tokens/s / peak FLOP/s, the
peak from blueberry/system/capabilities.py.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import subprocess
import sys

from common import ROOT, table, timed

VARIANTS = ("pytorch-fp32", "blueberry", "blueberry-adamw", "hf", "hf-compiled", "hf-loop")  # + "blueberry-nofp8" (GPU)


def worker(variant: str, model_type: str, preset: str, steps: int, n_layers: int | None = None) -> dict:
    import torch

    from blueberry.configs import get_config
    from blueberry.export.huggingface import hf_config
    from blueberry.models import create_model
    from blueberry.optimizers import setup_optimizers
    from blueberry.system import set_cpu_threads
    from blueberry.training.float8 import apply_float8

    overrides = {"use_fp8": False} if variant in ("pytorch-fp32", "blueberry-nofp8") else {}
    if n_layers:
        overrides["n_layers"] = n_layers
    cfg = get_config(preset, model_type=model_type, **overrides).validate()
    caps = cfg.capabilities()
    device = torch.device("cuda" if caps.is_cuda else "cpu")
    set_cpu_threads()
    torch.manual_seed(0)
    ours = create_model(cfg)
    flops_per_token = ours.flops_per_token(cfg.max_seq_len)
    amp = caps.autocast_dtype if variant != "pytorch-fp32" else None
    if variant.startswith("hf"):
        from transformers import AutoModelForCausalLM

        experts = {"experts_implementation": "eager"} if variant == "hf-loop" else {}
        model = AutoModelForCausalLM.from_config(hf_config(cfg.model), attn_implementation="sdpa", **experts).to(device)
        model.config.output_router_logits = True
        model.config.router_aux_loss_coef = cfg.load_balancing_weight
    else:  # FP8 applied from outside as training applies it (linears and, on Hopper+, the experts)
        model = apply_float8(ours.to(device), variant == "blueberry" and bool(cfg.use_fp8))
    params = list(model.parameters())
    if variant == "pytorch-fp32":
        optimizers = [torch.optim.AdamW(params, lr=1e-3, foreach=False, fused=False)]
    elif variant in ("blueberry", "blueberry-nofp8"):
        optimizers = setup_optimizers(model, cfg)
    else:
        optimizers = [torch.optim.AdamW(params, lr=1e-3, fused=True)]
    idx = torch.randint(0, cfg.vocab_size, (cfg.batch_size, cfg.max_seq_len), device=device)
    if variant == "hf-compiled" or (variant.startswith("blueberry") and cfg.compile):
        model = torch.compile(model)

    def step():
        ctx = torch.autocast(device.type, dtype=amp) if amp else contextlib.nullcontext()
        with ctx:
            out = model(idx, labels=idx) if variant.startswith("hf") else model(idx, idx)
        out.loss.backward()
        for o in optimizers:
            o.step()
            o.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()

    sec = timed(step, warmup=2, repeats=steps, stat="min")  # compilation happens in the warm-up
    tps = cfg.batch_size * cfg.max_seq_len / sec
    peak_mb = (torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda"
               else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {"variant": variant, "model": model_type, "tokens_per_sec": tps, "step_s": sec,
            "mfu": flops_per_token * tps / caps.peak_flops, "peak_mb": peak_mb,
            "precision": (str(amp).replace("torch.", "") if amp else "fp32")
            + (" +compile" if variant == "hf-compiled" or (variant.startswith("blueberry") and cfg.compile) else ""),
            "device": caps.device_name}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="cpu")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--models", default="moe,standard")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--n-layers", type=int, default=None, help="the preset at this depth (where the full one "
                                                              "would not finish in the time there is)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--model", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.model, args.config, args.steps, args.n_layers)))
        return
    results: dict = {}
    variants = args.variants.split(",")
    for repeat in range(args.repeats):
        for model in args.models.split(","):
            shift = repeat % len(variants)  # rotate the order so no variant always follows the same one
            for variant in variants[shift:] + variants[:shift]:
                if variant == "hf-loop" and model != "moe":
                    continue
                out = subprocess.run([sys.executable, __file__, "--worker", variant, "--model", model,
                                      "--config", args.config, "--steps", str(args.steps)]
                                     + (["--n-layers", str(args.n_layers)] if args.n_layers else []),
                                     capture_output=True, text=True, cwd=ROOT)
                if out.returncode != 0:
                    print(f"{variant}/{model} failed:\n{out.stderr[-2000:]}", file=sys.stderr)
                    continue
                r = json.loads(out.stdout.strip().splitlines()[-1])
                print(f"{variant}/{model}: {r['tokens_per_sec']:,.0f} tokens/s", flush=True)  # kept if a later one hangs
                results.setdefault((model, variant), []).append(r)
    rows = []
    for model in args.models.split(","):
        best = {v: max(results[(model, v)], key=lambda r: r["tokens_per_sec"])
                for v in args.variants.split(",") if (model, v) in results}
        base = best.get("pytorch-fp32")
        hf_runs = [best[v] for v in ("hf", "hf-compiled", "hf-loop") if v in best]
        hf = max(hf_runs, key=lambda r: r["tokens_per_sec"]) if hf_runs else None
        for v, r in best.items():
            rows.append([model, v, r["precision"], f"{r['tokens_per_sec']:,.0f}", f"{r['mfu'] * 100:.2f}%",
                         f"{r['peak_mb']:,.0f}",
                         f"{r['tokens_per_sec'] / base['tokens_per_sec']:.2f}x" if base else "n/a",
                         f"{r['tokens_per_sec'] / hf['tokens_per_sec']:.2f}x" if hf else "n/a"])
    device = next(iter(results.values()))[0]["device"] if results else "?"
    depth = f" at {args.n_layers} layers" if args.n_layers else ""
    print(f"Training step (fwd+bwd+optimizer), preset {args.config}{depth}, device {device}, fastest of {args.steps} "
          f"steps, best of {args.repeats} processes")
    print(table(["model", "variant", "precision", "tokens/s", "MFU", "peak MB", "vs pytorch-fp32", "vs best HF"], rows))


if __name__ == "__main__":
    main()
