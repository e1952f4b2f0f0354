"""The product spec's module of "complex components": attention, Mixture of Experts and the block built
from them, gathered under the names the spec uses. Each lives in its own file (attention.py, moe.py,
block.py); import from there in new code."""

from __future__ import annotations

from ..configs import model_config_of
from .attention import KVCache, MultiHeadAttention
from .block import TransformerBlock
from .moe import MixtureOfExperts, MoEAux

__all__ = ["KVCache", "MixtureOfExperts", "MoEAux", "MultiHeadAttention", "StandardTransformerBlock",
           "TransformerBlock"]


def StandardTransformerBlock(config) -> TransformerBlock:
    """A dense block (the spec's example of composing components into a custom model)."""
    return TransformerBlock(model_config_of(config), use_moe=False)
