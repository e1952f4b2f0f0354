"""The memory estimate's activation term (training/memory.py) beside two measurements of one training step's
peak tensor memory above what the model and its gradients hold, on CPU, for small models of each kind:

  measured     torch.profiler's allocation record of a real step (profile_memory=True): every allocation and
               free of the CPU allocator, in order; its running sum's peak
  fake         PyTorch's MemTracker (torch.distributed._tools.mem_tracker) over the same step run on fake
               tensors (FakeTensorMode: shapes only, nothing computed or allocated), as torchtitan estimates
  rule         Blueberry's estimate of the activations

    python benchmarks/memory_estimate.py [--quick]
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
from blueberry.training.memory import estimate  # noqa: E402

SHAPES = [dict(), dict(d_model=256, n_heads=8), dict(max_seq_len=256), dict(model_type="moe", num_experts=4),
          dict(layers="mamba:mlp"), dict(layers="retention:mlp"), dict(vocab_size=4096)]


def config(mode: str, amp: bool, **shape) -> AdaptiveMoEModelConfig:
    base = dict(model_type="standard", d_model=128, n_layers=4, n_heads=4, max_seq_len=128, batch_size=8,
                vocab_size=512, device="cpu", use_fp8=False, compile=False, use_amp=amp,
                activation_checkpointing=mode)
    return AdaptiveMoEModelConfig(**{**base, **shape}).validate()


def training_step(cfg):
    """A built model (gradients already allocated by one step) and a function running one more step."""
    torch.manual_seed(0)
    model = apply_activation_checkpointing(create_model(cfg).train(), cfg.training.activation_checkpointing)
    idx = torch.randint(0, cfg.model.vocab_size, (cfg.training.batch_size, cfg.model.max_seq_len))

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.training.use_amp):
            loss = model(idx, idx).loss
        loss.backward()

    step()
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fp32, no checkpointing only")
    args = parser.parse_args()
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
                rule = estimate(create_model(cfg), cfg)["activations"]
                rows.append([mode, "bf16" if amp else "fp32", ", ".join(f"{k}={v}" for k, v in shape.items()) or
                             "d128 x4, seq 128, batch 8", f"{got / 2**20:.1f}", fake, f"{rule / 2**20:.1f}",
                             f"{rule / got:.2f}"])
                print(rows[-1], flush=True)
    print(table(["checkpointing", "precision", "shape", "measured MiB", "fake MiB", "rule MiB", "rule / measured"],
                rows))


if __name__ == "__main__":
    main()
