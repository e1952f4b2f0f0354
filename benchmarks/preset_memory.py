"""Memory per device of each GPU preset by the estimate (training/memory.py), for every activation
checkpointing mode, on the GPUs it is named for; the model is built on the meta device, so any machine runs it.

    python benchmarks/preset_memory.py
"""

from __future__ import annotations

import torch

from common import table

from blueberry.configs import get_config  # noqa: E402
from blueberry.configs.fields import ACTIVATION_CHECKPOINTING  # noqa: E402
from blueberry.configs.presets import PRESET_HARDWARE  # noqa: E402
from blueberry.models import create_model  # noqa: E402
from blueberry.training.memory import GIB, estimate  # noqa: E402


def main() -> None:
    rows = []
    for preset, (memory_gb, gpus) in PRESET_HARDWARE.items():
        config = get_config(preset, device="cuda", use_fp8=False, use_amp=True)
        with torch.device("meta"):
            model = create_model(config)
        sizes = {mode: estimate(model, config, gpus, mode, "cuda") for mode in ACTIVATION_CHECKPOINTING}
        states = sizes["none"]["weights"] + sizes["none"]["gradients"] + sizes["none"]["optimizer"]
        chosen = next((m for m in ACTIVATION_CHECKPOINTING if sizes[m]["total"] <= memory_gb * GIB), "none fits")
        rows.append([preset, f"{gpus} x {memory_gb} GB", f"{sizes['none']['parameters'] / 1e6:,.0f}M",
                     f"{states / GIB:.1f}" + (" (FSDP2)" if gpus > 1 and config.training.parallel == "fsdp" else ""),
                     *(f"{sizes[m]['activations'] / GIB:.1f}" for m in ACTIVATION_CHECKPOINTING),
                     chosen, f"{sizes[chosen]['total'] / GIB:.1f}" if chosen in sizes else "-"])
    print(table(["preset", "GPUs", "parameters", "weights + grads + optimizer GiB", "activations GiB: none",
                 "selective", "full", "chosen", "total GiB"], rows))


if __name__ == "__main__":
    main()
