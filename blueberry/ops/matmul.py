"""The one entry point the models use for matrix products: FP8 when asked and worthwhile, else plain."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .fp8 import fp8_linear, fp8_shapes_qualify


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           use_fp8: bool = False) -> torch.Tensor:
    """y = x @ weight.T + bias. FP8 only when `use_fp8` and the weight's shape qualifies."""
    if use_fp8 and fp8_shapes_qualify(weight.shape[1], weight.shape[0]):
        return fp8_linear(x, weight, bias)
    return F.linear(x, weight, bias)


def matmul(x: torch.Tensor, w: torch.Tensor, use_fp8: bool | None = None) -> torch.Tensor:
    """x @ w for a 2-D `w` of shape (in, out).

    `use_fp8=None` asks the detected hardware (FP8 on compute capability >= 8.9); False never uses it.
    """
    if use_fp8 is None:
        from ..system import SYSTEM_CONFIG

        use_fp8 = SYSTEM_CONFIG.supports_fp8 and x.is_cuda
    return linear(x, w.t(), None, use_fp8=use_fp8)
