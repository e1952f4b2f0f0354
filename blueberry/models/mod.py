"""Mixture-of-Depths (Raposo et al., 2024): a router lets only a fixed fraction of the tokens through a block.

Training: a linear router scores every token; the top `capacity * seq` of each row (kept in sequence
order) go through the block as a shorter sequence at their own positions, and their update is scaled
by sigmoid(score), so the router learns through it. The others skip the block: their residual stream
passes unchanged (bit for bit).

Top-k over a sequence looks at the future, which generation cannot. So a small causal predictor
(an MLP on the block's input, gradient stopped) learns, by a binary cross-entropy weighted by
`mod_aux_weight`, whether each token is in the top-k; evaluation and generation route by its
decision (logit > 0), token by token. Tokens it skips are written to the KV cache as invalid keys, so
later tokens never see them, exactly as in training where skipped tokens are absent.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import KVCache
from .block import Block
from .moe import MoEAux


@dataclass
class MoDAux:
    loss: torch.Tensor  # the predictor's weighted loss (+ the inner MoE's, if any)
    moe: MoEAux | None  # the inner block's MoE outputs


class MixtureOfDepths(nn.Module):
    def __init__(self, block: Block, d_model: int, capacity: float = 0.125, aux_weight: float = 0.01):
        super().__init__()
        self.block, self.capacity, self.aux_weight = block, capacity, aux_weight
        self.router = nn.Linear(d_model, 1, bias=False)
        hidden = max(d_model // 8, 8)
        self.predictor = nn.Sequential(nn.Linear(d_model, hidden, bias=False), nn.SiLU(),
                                       nn.Linear(hidden, 1, bias=False))

    @property
    def is_moe(self) -> bool:
        return self.block.is_moe

    @property
    def ffn(self):
        return self.block.ffn

    def new_cache(self, batch: int, max_len: int, device, dtype):
        """The block's cache; attention's keeps which tokens were processed (the skipped ones are not seen)."""
        cache = self.block.new_cache(batch, max_len, device, dtype)
        return cache.with_validity() if isinstance(cache, KVCache) else cache

    def forward(self, x: torch.Tensor, doc_ids=None, kv_cache=None, positions=None):
        scores = self.router(x).squeeze(-1)
        predicted = self.predictor(x.detach()).squeeze(-1).float()
        if self.training and kv_cache is None:
            return self._routed_top_k(x, scores, predicted, doc_ids)
        keep = predicted > 0
        y, aux = self.block(x, doc_ids=doc_ids, kv_cache=kv_cache, positions=positions, key_mask=keep)
        weight = torch.sigmoid(scores)[..., None].to(x.dtype)
        out = torch.where(keep[..., None], x + weight * (y - x), x)
        return out, MoDAux(loss=x.new_zeros((), dtype=torch.float32) + (aux.loss if aux is not None else 0), moe=aux)

    def tokens_per_row(self, length: int) -> int:
        return max(1, math.ceil(self.capacity * length))

    def _routed_top_k(self, x, scores, predicted, doc_ids):
        batch, length, width = x.shape
        chosen = scores.topk(self.tokens_per_row(length), dim=1).indices.sort(dim=1).values  # (B, k)
        index = chosen[..., None].expand(-1, -1, width)
        x_in = x.gather(1, index)
        y, aux = self.block(x_in, doc_ids=None if doc_ids is None else doc_ids.gather(1, chosen), positions=chosen)
        weight = torch.sigmoid(scores.gather(1, chosen))[..., None].to(x.dtype)
        out = x.scatter(1, index, x_in + weight * (y - x_in))
        selected = torch.zeros(batch, length, device=x.device).scatter(1, chosen, 1.0)
        loss = self.aux_weight * F.binary_cross_entropy_with_logits(predicted, selected)
        return out, MoDAux(loss=loss + (aux.loss if aux is not None else 0), moe=aux)
