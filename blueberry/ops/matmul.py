"""The models' matrix products: FP8 when asked and worthwhile, else plain (`linear`, `matmul`); and the
inference product by a weight in the decode layout (`inference_linear`)."""

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


_ONEDNN = torch.backends.mkldnn.is_available()
ONEDNN_FROM_ROWS = 4  # the rows from which oneDNN's product is taken (see inference_linear)


def inference_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ weight.T + bias for inference. `ONEDNN_FROM_ROWS` rows or more of float32 by a CPU weight
    stored by input rows (the layout `Capabilities.decode_weights_transposed` asks for:
    `models.layers.stored_transposed`) run on oneDNN's kernel: MKL's generic path is slower there from a
    few rows up, though fastest for one; at two and three rows the two CPUs measured disagree, by less where
    oneDNN won (`benchmarks/gemv_layout.py`, docs/LOG.md). Anything else, and anything torch.compile traces
    (inductor picks its own kernels) or anything autograd records, is `F.linear`."""
    if (_ONEDNN and x.numel() >= ONEDNN_FROM_ROWS * x.shape[-1] and weight.stride(0) == 1
            and weight.stride(1) == weight.shape[0] > 1
            and weight.dtype == torch.float32 and x.dtype == torch.float32 and weight.device.type == "cpu"
            and torch.backends.mkldnn.enabled and not torch.compiler.is_compiling() and not _needs_grad(x, weight, bias)):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


def _needs_grad(*tensors) -> bool:
    """Whether autograd would record this product (oneDNN's inference kernel has no backward)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def matmul(x: torch.Tensor, w: torch.Tensor, use_fp8: bool | None = None) -> torch.Tensor:
    """x @ w for a 2-D `w` of shape (in, out).

    `use_fp8=None` asks the detected hardware (FP8 on compute capability >= 8.9); False never uses it.
    """
    if use_fp8 is None:
        from ..system import SYSTEM_CONFIG

        use_fp8 = SYSTEM_CONFIG.supports_fp8 and x.is_cuda
    return linear(x, w.t(), None, use_fp8=use_fp8)
