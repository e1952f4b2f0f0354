"""The product spec's names in models/, gathered: its "complex components" module. What exists only for code
written against the spec lives here; the package itself builds its models from block.py's `Block` and plain
`nn.Linear`s (FP8 is applied to them from outside: training/float8.py).

    AdaptiveLinear(in, out, use_fp8=True)   an nn.Linear whose matmul runs in FP8 through torchao's
                                            `Float8Linear` (dynamic tensorwise scaling, as the training
                                            transform), where the shape qualifies
    StandardTransformerBlock(config)        a dense block (the spec's example of a custom model)
    MultiHeadAttention, MixtureOfExperts, KVCache, MoEAux, TransformerBlock: attention.py, moe.py, block.py
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..configs import model_config_of
from ..extras import require
from ..ops.fp8 import fp8_shapes_qualify
from .attention import KVCache, MultiHeadAttention
from .block import TransformerBlock
from .moe import MixtureOfExperts, MoEAux

__all__ = ["AdaptiveLinear", "KVCache", "MixtureOfExperts", "MoEAux", "MultiHeadAttention",
           "StandardTransformerBlock", "TransformerBlock"]


class AdaptiveLinear(nn.Linear):
    """The spec's FP8-capable linear layer. With `use_fp8` and a shape that repays the casts
    (`ops.fp8.fp8_shapes_qualify`) its product is torchao's `Float8Linear` over this layer's own weight and
    bias (the `fp8` extra); otherwise, and always with `use_fp8=False`, it is exactly `nn.Linear`."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, use_fp8: bool = False):
        super().__init__(in_features, out_features, bias=bias)
        self.use_fp8 = use_fp8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_fp8 and fp8_shapes_qualify(self.in_features, self.out_features):
            return self._float8()(x)
        return F.linear(x, self.weight, self.bias)

    def _float8(self) -> nn.Module:
        """torchao's Float8Linear sharing this layer's parameters: built once, kept outside the module tree
        (no second copy in the state dict), rebuilt if the parameters were replaced."""
        twin = self.__dict__.get("_float8_twin")
        if twin is None or twin.weight is not self.weight or twin.bias is not self.bias:
            require("torchao", "fp8", "AdaptiveLinear(use_fp8=True)")
            from torchao.float8 import Float8LinearConfig
            from torchao.float8.float8_linear import Float8Linear

            twin = Float8Linear.from_float(self, config=Float8LinearConfig())
            self.__dict__["_float8_twin"] = twin
        return twin

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, use_fp8={self.use_fp8}"


def StandardTransformerBlock(config) -> TransformerBlock:
    """A dense block (the spec's example of composing components into a custom model)."""
    return TransformerBlock(model_config_of(config), use_moe=False)
