"""A block of the stack: a pre-norm token mixer (attention, Mamba-2 or retention), then a pre-norm
feed-forward (dense MLP, MoE, or none), each added to the residual stream. What a block holds comes
from its `LayerSpec` (configs/layer_pattern.py).

The mixer is stored under its kind's name (`attn`, `mamba`, `retention`, with `attn_norm` ...), so
checkpoint keys say what they are and dense/MoE checkpoints keep their names.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..configs.layer_pattern import LayerSpec
from .attention import MultiHeadAttention
from .layers import RMSNorm, dropout_layer, make_mlp
from .mamba2 import Mamba2
from .moe import MixtureOfExperts
from .retention import MultiScaleRetention


def make_mixer(kind: str, config) -> nn.Module:
    if kind == "attn":
        return MultiHeadAttention(
            config.d_model, config.n_heads, config.max_seq_len, n_kv_heads=config.n_kv_heads,
            qk_norm=config.qk_norm, rope_theta=config.rope_theta, dropout=config.dropout, norm_eps=config.norm_eps,
            head_dim=config.head_dim, qkv_bias=config.qkv_bias)
    if kind == "mamba":
        return Mamba2(config.d_model, d_state=config.ssm_state, head_dim=config.ssm_head_dim,
                      expand=config.ssm_expand, conv_width=config.ssm_conv, chunk=config.scan_chunk,
                      norm_eps=config.norm_eps)
    if kind == "retention":
        return MultiScaleRetention(config.d_model, config.n_heads, config.max_seq_len, head_dim=config.head_dim,
                                   rope_theta=config.rope_theta, chunk=config.scan_chunk, norm_eps=config.norm_eps)
    raise ValueError(f"unknown mixer {kind!r}")


def make_feed_forward(kind: str, config) -> nn.Module | None:
    if kind == "moe":
        return MixtureOfExperts(
            config.d_model, config.expert_d_ff, num_experts=config.num_experts, top_k=config.expert_top_k,
            capacity_factor=config.capacity_factor, load_balancing_weight=config.load_balancing_weight,
            z_loss_weight=config.router_z_loss_weight, router_noise=config.router_noise,
            shared_expert=config.shared_expert, mlp_type=config.mlp_type)
    if kind == "mlp":
        return make_mlp(config.mlp_type, config.d_model, config.d_ff, config.dropout)
    return None


class Block(nn.Module):
    """x + mixer(norm(x)), then x + ffn(norm(x)). `config` is a ModelConfig."""

    def __init__(self, config, spec: LayerSpec = LayerSpec("attn", "mlp")):
        super().__init__()
        self.spec, self.mixer_name = spec, spec.mixer
        self.add_module(f"{spec.mixer}_norm", RMSNorm(config.d_model, eps=config.norm_eps))
        self.add_module(spec.mixer, make_mixer(spec.mixer, config))
        ffn = make_feed_forward(spec.ffn, config)
        self.ffn_norm = RMSNorm(config.d_model, eps=config.norm_eps) if ffn is not None else None
        self.ffn = ffn
        self.resid_dropout = dropout_layer(config.dropout)

    @property
    def mixer(self) -> nn.Module:
        return getattr(self, self.mixer_name)

    @property
    def mixer_norm(self) -> nn.Module:
        return getattr(self, f"{self.mixer_name}_norm")

    @property
    def is_moe(self) -> bool:
        return isinstance(self.ffn, MixtureOfExperts)

    def new_cache(self, batch: int, max_len: int, device, dtype):
        """What generation keeps for this block: a KV cache (attention) or a fixed-size state."""
        return self.mixer.new_cache(batch, max_len, device, dtype)

    def forward(self, x: torch.Tensor, doc_ids=None, kv_cache=None, positions=None, key_mask=None):
        """Returns (the new residual stream, the MoE's auxiliary outputs or None)."""
        mixer_kwargs = dict(doc_ids=doc_ids, positions=positions)
        if self.mixer_name == "attn":
            mixer_kwargs.update(kv_cache=kv_cache, key_mask=key_mask)
        else:
            mixer_kwargs.update(cache=kv_cache)
        x = x + self.resid_dropout(self.mixer(self.mixer_norm(x), **mixer_kwargs))
        if self.ffn is None:
            return x, None
        aux = None
        if self.is_moe:
            h, aux = self.ffn(self.ffn_norm(x))
        else:
            h = self.ffn(self.ffn_norm(x))
        return x + self.resid_dropout(h), aux


class TransformerBlock(Block):
    """The attention block of the dense and MoE transformers (attention, then an MLP or an MoE)."""

    def __init__(self, config, use_moe: bool):
        super().__init__(config, LayerSpec("attn", "moe" if use_moe else "mlp"))
