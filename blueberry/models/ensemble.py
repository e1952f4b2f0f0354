"""`EnsembleLM`: several trained language models used as one, predicting the mean of their next-token
distributions: p(x) = (1/M) sum_m softmax(logits_m)(x).

Its `logits` are the mixture's log-probabilities (log-sum-exp of the members' log-softmax minus log M), so
everything that reads logits — the loss, bits per byte, sampling, multiple-choice scoring — sees the
mixture. The members must share a tokenizer (vocabulary) and a context window; they may differ in shape
or kind of stack. Generation keeps one cache per member block, concatenated in member order.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops.cross_entropy import IGNORE_INDEX
from .adaptive_llm import LMOutput, TransformerLM


class EnsembleLM(nn.Module):
    def __init__(self, members: list[nn.Module]):
        super().__init__()
        if len(members) < 2:
            raise ValueError(f"an ensemble needs at least two members, got {len(members)}")
        first = members[0].config
        for i, m in enumerate(members[1:], 1):
            if m.config.vocab_size != first.vocab_size or m.config.max_seq_len != first.max_seq_len:
                raise ValueError(f"member {i} has vocabulary {m.config.vocab_size} and context "
                                 f"{m.config.max_seq_len}; member 0 has {first.vocab_size} and "
                                 f"{first.max_seq_len}: an ensemble's members must share both")
        self.members = nn.ModuleList(members)
        self.config = first

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                doc_ids: torch.Tensor | None = None, kv_caches: list | None = None,
                positions: torch.Tensor | None = None, return_logits: bool = False,
                last_only: bool = False, logits_at: torch.Tensor | None = None) -> LMOutput:
        """The members' forward (same arguments as `TransformerLM.forward`); logits are the mixture's
        log-probabilities, and with `targets` the loss is the mixture's cross-entropy."""
        mixture, expert_load, start = None, [], 0
        for member in self.members:
            caches = None
            if kv_caches:
                caches = kv_caches[start:start + len(member.blocks)]
                start += len(member.blocks)
            out = member(idx, doc_ids=doc_ids, kv_caches=caches, positions=positions, last_only=last_only,
                         logits_at=logits_at)
            logp = torch.log_softmax(out.logits.float(), dim=-1)
            mixture = logp if mixture is None else torch.logaddexp(mixture, logp)  # one pass per member
            expert_load += out.expert_load
        mixture = mixture - math.log(len(self.members))
        out = LMOutput(logits=mixture, aux_loss=mixture.new_zeros(()), expert_load=expert_load)
        if targets is not None:
            out.lm_loss = F.nll_loss(mixture.flatten(0, -2), targets.reshape(-1), ignore_index=IGNORE_INDEX)
            out.loss = out.lm_loss
        return out

    # ---- reporting ----
    def parameter_report(self) -> dict:
        reports = [m.parameter_report() for m in self.members]
        return {key: sum(r[key] for r in reports) for key in reports[0]}

    def flops_per_token(self, seq_len: int) -> float:
        return sum(m.flops_per_token(seq_len) for m in self.members)

    # ---- generation ----
    def new_kv_caches(self, batch: int, max_len: int | None = None, dtype: torch.dtype | None = None) -> list:
        return [c for m in self.members for c in m.new_kv_caches(batch, max_len, dtype)]

    @property
    def pads_independently(self) -> bool:
        return all(m.pads_independently for m in self.members)

    def fuse_projections(self, transposed: bool = False) -> "EnsembleLM":
        for m in self.members:
            m.fuse_projections(transposed)
        return self

    # sampling with a cache, as one model does (it needs only the methods above)
    generate = TransformerLM.generate
