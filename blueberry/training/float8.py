"""FP8 training applied to a built model from outside, as torchtitan does: torchao's
`convert_to_float8_training` swaps the qualifying `nn.Linear`s for its `Float8Linear` (dynamic
tensorwise scaling, e4m3 forward / e5m2 gradients; with FSDP2 the all-gathers run in float8, and it
composes with torch.compile). The model code knows nothing of it.

MoE experts: their grouped matmuls are swapped for torchao's rowwise-scaled FP8 grouped GEMM
(`ops.grouped_mm.fp8_expert_matmul`) on devices that have one (Hopper and later), when the expert widths
are multiples of 16.

Left in bf16: the output head (the loss is sensitive to its precision), the MoE and Mixture-of-Depths
routers, the MoD predictor and the shared expert's gate (tiny), and linears whose dimensions are not
multiples of 16 or too small to repay the casts (`ops.fp8.fp8_shapes_qualify`). The seed's
`AdaptiveLinear(use_fp8=True)` runs torchao's Float8Linear too; `ops.fp8` (our own `torch._scaled_mm` product)
remains for the seed's functional `ops.matmul(x, w)`, which has no module to convert.
Whether FP8 is used at all when the user leaves it to the machine is measured (`training/fp8_choice.py`).
"""

from __future__ import annotations

import torch.nn as nn

from ..extras import require
from ..models.moe import MixtureOfExperts
from ..ops.fp8 import fp8_shapes_qualify
from ..ops.grouped_mm import fp8_expert_matmul
from ..system import detect_capabilities

_KEEP_HIGH_PRECISION = {"lm_head", "router", "shared_gate", "predictor"}


def float8_eligible(module: nn.Module, fqn: str) -> bool:
    """Which linears run in FP8."""
    if not isinstance(module, nn.Linear) or _KEEP_HIGH_PRECISION & set(fqn.split(".")):
        return False
    return fp8_shapes_qualify(module.in_features, module.out_features)


def fp8_experts_eligible(module: nn.Module) -> bool:
    """MoE experts whose grouped matmuls can run in FP8 (torchao needs K and N multiples of 16)."""
    return isinstance(module, MixtureOfExperts) and module.w_up.shape[-1] % 16 == 0 and module.d_ff % 16 == 0


def apply_float8(model: nn.Module, enabled: bool, fsdp: bool = False) -> nn.Module:
    """Convert `model`'s eligible linears in place when `enabled` (before DDP/FSDP wrapping and compile),
    and its experts' grouped matmuls where the device has FP8 grouped GEMMs."""
    if not enabled:
        return model
    require("torchao", "fp8", "FP8 training")
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    device = next(model.parameters()).device
    if device.type == "cuda" and detect_capabilities(str(device)).supports_fp8_grouped_mm:
        for module in model.modules():
            if fp8_experts_eligible(module):
                module.expert_matmul = fp8_expert_matmul
    config = Float8LinearConfig(enable_fsdp_float8_all_gather=fsdp)
    return convert_to_float8_training(model, config=config, module_filter_fn=float8_eligible)
