"""The memory estimate's activation term (training/memory.py) beside two measurements of one training step's
peak tensor memory above what the model and its gradients hold, on CPU, for small models of each kind:

  measured     torch.profiler's allocation record of a real step (profile_memory=True): every allocation and
               free of the CPU allocator, in order; its running sum's peak
  fake         PyTorch's MemTracker (torch.distributed._tools.mem_tracker) over the same step run on fake
               tensors (FakeTensorMode: shapes only, nothing computed or allocated), as torchtitan estimates
  estimate     Blueberry's estimate of the activations (training/memory.py)

    python benchmarks/memory_estimate.py [--quick]
    python benchmarks/memory_estimate.py --fit     # measure the estimate's coefficients and print them

`--fit` measures each block kind at 2 and 4 layers (the difference is what a block keeps, the rest what the
step holds beside the blocks), a larger vocabulary (the loss chunk's logits) and a longer sequence (the CPU
bf16 attention's scores), at the base shape only: the table's other shapes are left to check the estimate.
"""

from __future__ import annotations

import argparse
import sys

import torch

from common import ROOT, table

sys.path.insert(0, str(ROOT))

from blueberry.configs import AdaptiveMoEModelConfig  # noqa: E402
from blueberry.models import create_model  # noqa: E402
from blueberry.training.activation_checkpointing import apply_activation_checkpointing  # noqa: E402
from blueberry.training import memory  # noqa: E402
from blueberry.training.memory import estimate  # noqa: E402

SHAPES = [dict(), dict(d_model=256, n_heads=8), dict(max_seq_len=256), dict(model_type="moe", num_experts=4),
          dict(layers="mamba:mlp"), dict(layers="retention:mlp"), dict(vocab_size=4096)]


def config(mode: str, amp: bool, **shape) -> AdaptiveMoEModelConfig:
    base = dict(model_type="standard", d_model=128, n_layers=4, n_heads=4, max_seq_len=128, batch_size=8,
                vocab_size=512, device="cpu", use_fp8=False, compile=False, use_amp=amp,
                activation_checkpointing=mode)
    return AdaptiveMoEModelConfig(**{**base, **shape}).validate()


def training_step(cfg):
    """A built model, its gradients already allocated (zeros: the memory a first step leaves, at a fraction of
    its cost, which under bf16 on a CPU without native bf16 is most of this check's time), and a function
    running one step."""
    torch.manual_seed(0)
    model = apply_activation_checkpointing(create_model(cfg).train(), cfg.training.activation_checkpointing)
    idx = torch.randint(0, cfg.model.vocab_size, (cfg.training.batch_size, cfg.model.max_seq_len))
    for param in model.parameters():
        if param.requires_grad:
            param.grad = torch.zeros_like(param)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.training.use_amp):
            loss = model(idx, idx).loss
        loss.backward()

    return model, idx, step


def measured_peak(cfg) -> int:
    from torch.profiler import ProfilerActivity, profile

    _, _, step = training_step(cfg)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    changes = sorted((e.time_range.end, e.self_cpu_memory_usage) for e in prof.events() if e.self_cpu_memory_usage)
    live = peak = 0
    for _, change in changes:
        live += change
        peak = max(peak, live)
    return peak


def fake_peak(cfg) -> int:
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker

    with FakeTensorMode():
        model, idx, step = training_step(cfg)
        tracker = MemTracker()
        tracker.track_external(model, idx)
        with tracker:
            before = tracker.get_tracker_snapshot("current")
            step()
        peak = tracker.get_tracker_snapshot("peak")
    total = lambda snapshot: sum(v.get("Total", 0) for v in snapshot.values())  # noqa: E731
    return total(peak) - total(before)


KINDS = {("attn", "mlp"): dict(layers="attn:mlp"), ("attn", "moe"): dict(layers="attn:moe", num_experts=4),
         ("mamba", "mlp"): dict(layers="mamba:mlp"), ("retention", "mlp"): dict(layers="retention:mlp")}
MODES = ("none", "selective", "full")


def fit() -> None:
    """Measure and print training/memory.py's coefficients (per token, in fp32 values)."""
    calibration, hidden, copies, scores = {}, {}, {}, {}
    for amp, precision in ((False, "fp32"), (True, "bf16")):
        base = config("none", amp)
        tokens, d, vocab = base.training.batch_size * base.model.max_seq_len, base.model.d_model, base.model.vocab_size
        per_value = lambda peak: peak / (4 * tokens)  # noqa: E731
        big = config("none", amp, vocab_size=8 * vocab)
        copies[precision] = per_value(measured_peak(big) - measured_peak(base)) / (7 * vocab)
        score_values = base.model.n_heads * base.model.max_seq_len / 4  # a token's scores, in fp32 values
        for mode in MODES:  # beyond linear in the sequence: the scores of the matmul form (CPU, bf16)
            scores[mode] = 0.0
            if amp:
                short = measured_peak(config(mode, amp))
                beyond_linear = measured_peak(config(mode, amp, max_seq_len=2 * base.model.max_seq_len)) - 2 * short
                holders = 1 if mode == "full" else base.model.n_layers
                scores[mode] = beyond_linear / (holders * 2 * base.training.batch_size * base.model.n_heads
                                                * base.model.max_seq_len ** 2)
        for (mixer, ffn), shape in KINDS.items():
            for mode in MODES:
                two, four = (per_value(measured_peak(config(mode, amp, n_layers=n, **shape))) for n in (2, 4))
                cfg = config(mode, amp, **shape)
                values = memory.block_values(cfg, cfg.model.layer_pattern[0])
                own_scores = (scores[mode] * score_values if mixer == "attn" else 0.0)
                kept = (four - two) / 2 - (own_scores if mode != "full" else 0.0)
                rest = two - 2 * ((four - two) / 2) - (own_scores if mode == "full" else 0.0)
                if mode == "none" and (mixer, ffn) == ("attn", "mlp"):
                    hidden[precision] = (rest - copies[precision] * vocab) / d
                calibration[mixer, ffn, mode, precision] = (round(kept / values, 3),
                                                            0.0 if mode == "none" else round(rest / values, 3))
                print(mixer, ffn, mode, precision, calibration[mixer, ffn, mode, precision], flush=True)
    print("CALIBRATION =", calibration)
    print("HIDDEN =", {k: round(v, 2) for k, v in hidden.items()})
    print("LOGIT_COPIES =", {k: round(v, 2) for k, v in copies.items()})
    print("SCORE_BYTES =", {k: round(v, 1) for k, v in scores.items()})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fp32, no checkpointing only")
    parser.add_argument("--fit", action="store_true", help="measure the estimate's coefficients and print them")
    args = parser.parse_args()
    if args.fit:
        return fit()
    rows = []
    for mode in ("none",) if args.quick else ("none", "selective", "full"):
        for amp in (False,) if args.quick else (False, True):
            for shape in SHAPES:
                cfg = config(mode, amp, **shape)
                got = measured_peak(cfg)
                try:
                    fake = f"{fake_peak(cfg) / 2**20:.1f}"
                except RuntimeError as exc:  # e.g. a meta kernel stricter than the CPU one
                    fake = f"n/a ({str(exc).splitlines()[0][:40]})"
                rule = estimate(create_model(cfg), cfg, device_type="cpu")["activations"]
                rows.append([mode, "bf16" if amp else "fp32", ", ".join(f"{k}={v}" for k, v in shape.items()) or
                             "d128 x4, seq 128, batch 8", f"{got / 2**20:.1f}", fake, f"{rule / 2**20:.1f}",
                             f"{rule / got:.2f}"])
                print(rows[-1], flush=True)
    print(table(["checkpointing", "precision", "shape", "measured MiB", "fake MiB", "estimate MiB", "estimate / measured"],
                rows))


if __name__ == "__main__":
    main()
