"""Plain PyTorch models: layers -> attention, MoE -> the block -> complete LMs. They see only a
ModelConfig: no data, optimizer, distribution, precision transforms, logging or CLI here."""

from .adaptive_llm import (
    AdaptiveMoEMinimalLLM,
    LMOutput,
    StandardTransformerLLM,
    TransformerLM,
    create_model,
)
from .attention import KVCache, MultiHeadAttention
from .block import TransformerBlock
from .components import AdaptiveLinear, StandardTransformerBlock
from .generation import generate_text, sample_next
from .layers import MLP, RMSNorm, RotaryEmbedding, SwiGLU
from .moe import MixtureOfExperts, MoEAux

__all__ = [
    "AdaptiveLinear", "AdaptiveMoEMinimalLLM", "KVCache", "LMOutput", "MLP", "MixtureOfExperts", "MoEAux",
    "MultiHeadAttention", "RMSNorm", "RotaryEmbedding", "StandardTransformerBlock",
    "StandardTransformerLLM", "SwiGLU", "TransformerBlock", "TransformerLM", "create_model",
    "generate_text", "sample_next",
]
