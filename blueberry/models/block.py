"""The transformer block: pre-norm attention, then a pre-norm feed-forward (a dense MLP or an MoE layer)."""

from __future__ import annotations

import torch
import torch.nn as nn

from .attention import KVCache, MultiHeadAttention
from .layers import RMSNorm, make_mlp
from .moe import MixtureOfExperts


class TransformerBlock(nn.Module):
    """x + attn(norm(x)), then x + ffn(norm(x)). `config` is a ModelConfig."""

    def __init__(self, config, use_moe: bool):
        super().__init__()
        self.attn_norm = RMSNorm(config.d_model, eps=config.norm_eps)
        self.attn = MultiHeadAttention(
            config.d_model, config.n_heads, config.max_seq_len, n_kv_heads=config.n_kv_heads,
            qk_norm=config.qk_norm, rope_theta=config.rope_theta, dropout=config.dropout, norm_eps=config.norm_eps,
            head_dim=config.head_dim, qkv_bias=config.qkv_bias)
        self.ffn_norm = RMSNorm(config.d_model, eps=config.norm_eps)
        if use_moe:
            self.ffn = MixtureOfExperts(
                config.d_model, config.expert_d_ff, num_experts=config.num_experts, top_k=config.expert_top_k,
                capacity_factor=config.capacity_factor, load_balancing_weight=config.load_balancing_weight,
                z_loss_weight=config.router_z_loss_weight, router_noise=config.router_noise,
                shared_expert=config.shared_expert, mlp_type=config.mlp_type)
        else:
            self.ffn = make_mlp(config.mlp_type, config.d_model, config.d_ff, config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)

    @property
    def is_moe(self) -> bool:
        return isinstance(self.ffn, MixtureOfExperts)

    def forward(self, x: torch.Tensor, doc_ids=None, kv_cache: KVCache | None = None, positions=None):
        x = x + self.resid_dropout(self.attn(self.attn_norm(x), doc_ids=doc_ids, kv_cache=kv_cache,
                                             positions=positions))
        aux = None
        if self.is_moe:
            h, aux = self.ffn(self.ffn_norm(x))
        else:
            h = self.ffn(self.ffn_norm(x))
        return x + self.resid_dropout(h), aux
