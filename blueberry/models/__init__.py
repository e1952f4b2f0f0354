"""Plain PyTorch models: layers -> components -> complete LMs. No distribution, logging or CLI here."""

from .adaptive_llm import (
    AdaptiveMoEMinimalLLM,
    LMOutput,
    StandardTransformerLLM,
    TransformerLM,
    create_model,
)
from .attention import KVCache, MultiHeadAttention
from .components import MoETransformerBlock, StandardTransformerBlock, TransformerBlock
from .generation import generate_text, sample_next
from .layers import MLP, AdaptiveLinear, RMSNorm, RotaryEmbedding, SwiGLU
from .moe import MixtureOfExperts, MoEAux

__all__ = [
    "AdaptiveLinear", "AdaptiveMoEMinimalLLM", "KVCache", "LMOutput", "MLP", "MixtureOfExperts", "MoEAux",
    "MoETransformerBlock", "MultiHeadAttention", "RMSNorm", "RotaryEmbedding", "StandardTransformerBlock",
    "StandardTransformerLLM", "SwiGLU", "TransformerBlock", "TransformerLM", "create_model",
    "generate_text", "sample_next",
]
