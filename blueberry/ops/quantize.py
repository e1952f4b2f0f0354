"""Weight-only quantization of a trained model for inference.

int8 (any device): every linear except the router and the shared-expert gate becomes an `Int8Linear`
— int8 weights with one fp32 scale per output channel (absmax / 127, symmetric). On CPU its matmul is
PyTorch's fused int8-weight kernel (`torch._weight_int8pack_mm`, fed bf16 activations, the form it is
fast for), elsewhere a dequantise-and-matmul.
MoE experts get the same treatment per expert and output row (`MixtureOfExperts.expert_weight`
dequantises the experts a token uses). Activations stay in the model's dtype.
int4 (CUDA): torchao's groupwise int4 weight-only (`Int4WeightOnlyConfig`, tinygemm kernels). torchao
packs int4 weights for the device they run on, so an int4 run stores the bf16 weights and is packed
when loaded; without a CUDA GPU it is refused with a message.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import UsageError
from ..extras import require

METHODS = ("int8", "int4")
INT4_GROUP_SIZE = 128
_KEEP_FULL_PRECISION = ("router", "shared_gate")


class Int8Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(out_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        q = cls(linear.in_features, linear.out_features, linear.bias is not None).to(linear.weight.device)
        q.weight, q.scale = quantize_rows(linear.weight)
        if linear.bias is not None:
            q.bias.data.copy_(linear.bias.data)
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16):
            # the CPU kernel is vectorised for bf16 activations only; fp32 ones take it through bf16
            y = torch._weight_int8pack_mm(x2.to(torch.bfloat16).contiguous(), self.weight,
                                          self.scale.to(torch.bfloat16)).to(x.dtype)
        else:
            y = F.linear(x2, self.weight.to(x.dtype)) * self.scale.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, int8 per-channel"


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 along the last dim: (int8 weight, fp32 scale per row), weight ~ q * scale."""
    w = weight.detach().float().contiguous()  # whatever layout an engine gave it (`stored_transposed`)
    scale = w.abs().amax(dim=-1).clamp(min=1e-12) / 127.0
    q = torch.round(w / scale.unsqueeze(-1)).clamp(-127, 127).to(torch.int8)
    return q, scale


def quantize_model(model: nn.Module, method: str) -> nn.Module:
    """Quantize `model` in place for inference (see the module docstring); returns it in eval mode."""
    if method not in METHODS:
        raise UsageError(f"--method {method}: choose one of {', '.join(METHODS)}")
    model.eval()
    if method == "int4":
        return _int4(model)
    if getattr(model.config, "tie_embeddings", False):
        model.lm_head = nn.Linear(model.lm_head.in_features, model.lm_head.out_features, bias=False)
        model.lm_head.weight = nn.Parameter(model.embed.weight.detach().contiguous().clone())  # its own copy
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and child_name not in _KEEP_FULL_PRECISION:
                setattr(module, child_name, Int8Linear.from_linear(child))
        if hasattr(module, "w_up") and hasattr(module, "w_down") and isinstance(module.w_up, nn.Parameter):
            for weight_name in ("w_up", "w_down"):
                q, scale = quantize_rows(getattr(module, weight_name))
                delattr(module, weight_name)
                module.register_buffer(weight_name, q)
                module.register_buffer(weight_name + "_scale", scale)
    return model


def _int4(model: nn.Module) -> nn.Module:
    device = next(model.parameters()).device
    if device.type != "cuda":
        raise UsageError("int4 needs a CUDA GPU (torchao's int4 kernels); on this machine use --method int8")
    require("torchao", "fp8", "int4 quantization")
    from torchao.quantization import Int4WeightOnlyConfig, quantize_

    def eligible(module, fqn):
        return (isinstance(module, nn.Linear) and fqn.rsplit(".", 1)[-1] not in _KEEP_FULL_PRECISION
                and module.in_features % INT4_GROUP_SIZE == 0)

    model.to(torch.bfloat16)
    quantize_(model, Int4WeightOnlyConfig(group_size=INT4_GROUP_SIZE, int4_packing_format="tile_packed_to_4d"),
              filter_fn=eligible)
    return model


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the weights an inference step reads (parameters and weight buffers, tied ones once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + [b for n, b in model.named_buffers() if "weight" in n or "w_" in n
                                        or n.endswith("scale")]:
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total
