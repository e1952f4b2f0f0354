"""Expert matmuls over rows sorted by expert: one `F.grouped_mm` where the device has it, else a loop
over the contiguous slices; `fp8_expert_matmul` is the same product through torchao's rowwise-scaled FP8
grouped GEMM (Hopper and later; training swaps it in from outside, `training/float8.py`). Which one, and
how to pad each expert's group, is asked of `system/`."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..system import detect_capabilities
from .slice_loop import slice_loop


# Detected once, at import: the compiled MoE forward then reads plain constants.
_CAPABILITIES = {"cpu": detect_capabilities("cpu")}
if torch.cuda.is_available():
    _CAPABILITIES["cuda"] = detect_capabilities("cuda")


def _capabilities(device: torch.device):
    return _CAPABILITIES["cuda" if device.type == "cuda" else "cpu"]


def grouped_mm_usable(x: torch.Tensor) -> bool:
    """The device has grouped_mm and the kernel takes this dtype (and inductor can lower it)."""
    if x.device.type not in ("cpu", "cuda") or not _capabilities(x.device).supports_grouped_mm:
        return False
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False  # float64 (references in tests) takes the slice loop
    if torch.compiler.is_compiling() and x.dtype != torch.bfloat16:
        return False  # inductor lowers grouped_mm for bf16 only; other dtypes take the slice loop
    return x.device.type == "cpu" or x.dtype == torch.bfloat16


def group_alignment(device: torch.device, dtype: torch.dtype) -> int:
    """Rows per alignment unit of an expert group on this device, for this compute dtype."""
    return _capabilities(device).expert_group_alignment(dtype)


def expert_matmul(x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor,
                  use_grouped_mm: bool = True) -> torch.Tensor:
    """Rows of `x` sorted by expert; `weight` (E, out, in); `counts` (E,) rows per expert -> (rows, out)."""
    if use_grouped_mm and grouped_mm_usable(x):
        offs = torch.cumsum(counts, 0).to(torch.int32)
        return F.grouped_mm(x, weight.transpose(1, 2), offs=offs)
    if torch.compiler.is_compiling():  # traced, the loop's host-read sizes would recompile per layer and count
        from .untraced import untraced_slice_loop

        return untraced_slice_loop(x, weight, counts)
    return slice_loop(x, weight, counts)


def fp8_expert_matmul(x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor,
                      use_grouped_mm: bool = True) -> torch.Tensor:
    """`expert_matmul` in FP8: x and the expert weights cast to e4m3 with one scale per row (x) and per
    output column of each expert (weight), multiplied by `torch._scaled_grouped_mm`, gradients the same way
    (torchao's `_to_fp8_rowwise_then_scaled_grouped_mm`). The groups must already be padded to multiples
    of 16 rows (the MoE's dispatch does it: `group_alignment` on a GPU) and x be bf16 and row-major; any
    other case takes the bf16 product."""
    if not (x.is_cuda and x.dtype == torch.bfloat16 and x.shape[-1] % 16 == 0 and weight.shape[1] % 16 == 0):
        return expert_matmul(x, weight, counts, use_grouped_mm)
    from torchao.prototype.moe_training import _to_fp8_rowwise_then_scaled_grouped_mm

    offs = torch.cumsum(counts, 0).to(torch.int32)
    # weight (E, out, in) transposed is (E, in, out) with strides (out*in, 1, in): column-major per expert
    return _to_fp8_rowwise_then_scaled_grouped_mm(x.contiguous(), weight.transpose(1, 2), offs,
                                                  out_dtype=torch.bfloat16, pad_token_groups_for_grouped_mm=False)
