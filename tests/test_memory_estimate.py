"""The memory estimate (training/memory.py) against the peak a real training step allocates on CPU, with and
without activation checkpointing, in fp32 and under bf16 autocast. The peak is read from torch.profiler's record
of every allocation and free (benchmarks/memory_estimate.py's `measured_peak`); the estimate's coefficients were
measured at one shape (d_model 128, 4 layers, sequence 128 and 256, vocabulary 512 and 4,096, batch 8), so each
check is at another: longer, a larger vocabulary, deeper, and each mixer kind wider, each with a smaller batch.
(The vocabulary stays within one chunk of the fused loss: over several, the profiler's record attributes the
frees inside the loss's chunk loop to its end, and the peak it shows is not the allocator's.)"""

from __future__ import annotations

import logging
import sys

import pytest

from helpers import ROOT

from blueberry.models import create_model
from blueberry.training.memory import estimate

SHAPES = {"longer": dict(max_seq_len=384, batch_size=4), "vocabulary": dict(vocab_size=8192, batch_size=4),
          "deeper": dict(n_layers=6, batch_size=2),
          **{kind: dict(layers=f"{kind}:mlp", d_model=192, n_heads=6, batch_size=4) for kind in ("attn", "mamba",
                                                                                              "retention")},
          "moe": dict(layers="attn:moe", num_experts=4, d_model=192, n_heads=6, batch_size=4)}


@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("mode", ["none", "selective", "full"])
def test_the_estimate_is_within_15_percent_of_the_measured_peak(mode, amp):
    level = logging.getLogger("blueberry").level  # benchmarks quieten the package's logging: kept as it was
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from memory_estimate import config, measured_peak
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
        logging.getLogger("blueberry").setLevel(level)
    ratios = {}
    for name, shape in SHAPES.items():
        cfg = config(mode, amp, **shape)
        ratios[name] = estimate(create_model(cfg), cfg, device_type="cpu")["activations"] / measured_peak(cfg)
    print(mode, "bf16" if amp else "fp32", {k: round(v, 3) for k, v in ratios.items()})
    assert all(0.85 <= r <= 1.15 for r in ratios.values()), {k: round(v, 3) for k, v in ratios.items()}
