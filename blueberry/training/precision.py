"""Mixed precision chosen from capabilities: bf16 autocast where the hardware has bf16 units (CUDA
>= 8.0, CPUs with AMX or AVX512-BF16), fp16 with a gradient scaler on older GPUs, fp32 otherwise."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch


@dataclass
class Precision:
    device_type: str
    dtype: torch.dtype | None  # None: fp32
    scaler: torch.amp.GradScaler | None

    @property
    def name(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)


def choose_precision(config, caps) -> Precision:
    dtype = caps.autocast_dtype if config.training.use_amp else None
    scaler = torch.amp.GradScaler(caps.device_type) if dtype == torch.float16 else None
    return Precision(caps.device_type, dtype, scaler)
