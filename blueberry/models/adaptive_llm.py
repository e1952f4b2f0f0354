"""Complete language models: one stack of blocks described by the config's layer pattern (the MoE
model of the seed, a dense transformer, Mamba-2, retention, Mixture-of-Depths and hybrids), plus
`create_model`.

Init: every matrix N(0, init_std); the projections that write into the residual stream (attention and
retention output, Mamba-2 out_proj, MLP down, expert down) are scaled by 1/sqrt(2 * n_layers); norms
start at one; the state-space parameters (conv, A, dt, D) keep their mixer's own init.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ..configs import model_config_of
from ..ops.cross_entropy import linear_cross_entropy
from .block import Block
from .generation import sample_next
from .layers import InferenceLinear, RMSNorm, stored_transposed
from .mod import MixtureOfDepths, MoDAux
from .moe import MixtureOfExperts


@dataclass
class LMOutput:
    logits: torch.Tensor | None  # None for a call with targets unless return_logits=True
    loss: torch.Tensor | None = None  # lm_loss + aux_loss: what training minimises
    lm_loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    expert_load: list[torch.Tensor] = field(default_factory=list)  # one (num_experts,) per MoE layer
    moe_stats: torch.Tensor | None = None  # (len(MOE_STATS),) over the MoE layers, for the training log


MOE_STATS = ("max_expert_load", "dropped_fraction", "router_z_loss", "load_balancing_loss")


def _moe_stats(auxes) -> torch.Tensor:
    """The MOE_STATS figures of one forward, left on the device (the loop reads them with the loss)."""
    return torch.stack([torch.stack([a.expert_load.max() for a in auxes]).max(),
                        torch.stack([a.dropped_fraction for a in auxes]).float().mean(),
                        torch.stack([a.z_loss for a in auxes]).float().mean(),
                        torch.stack([a.load_balancing_loss for a in auxes]).float().mean()]).float()


def build_block(config, spec) -> nn.Module:
    block = Block(config, spec)
    return MixtureOfDepths(block, config.d_model, config.mod_capacity, config.mod_aux_weight) if spec.mod else block


class TransformerLM(nn.Module):
    """Decoder-only language model: embedding, the blocks of `config.layer_pattern`, norm, output head."""

    default_model_type: str | None = None  # the subclasses' kind of stack when the config has no --layers

    def __init__(self, config):
        super().__init__()
        config = model_config_of(config)  # a run's config or its ModelConfig: the model keeps the ModelConfig
        if config.layers is None and self.default_model_type not in (None, config.model_type):
            config = dataclasses.replace(config, model_type=self.default_model_type)
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList([build_block(config, spec) for spec in config.layer_pattern])
        self.norm = RMSNorm(config.d_model, eps=config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.config.init_std
        out_std = std / math.sqrt(2 * self.config.n_layers)
        for name, p in self.named_parameters():
            if name.endswith(".bias"):
                nn.init.zeros_(p)
            if p.dim() < 2 or ".conv." in name:
                continue
            is_output = name.endswith(("o_proj.weight", "down.weight", "w_down", "out_proj.weight"))
            nn.init.normal_(p, mean=0.0, std=out_std if is_output else std)
        for m in self.modules():
            if isinstance(m, nn.RMSNorm):
                nn.init.ones_(m.weight)
            if hasattr(m, "reset_special_parameters"):
                m.reset_special_parameters()

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                doc_ids: torch.Tensor | None = None, kv_caches: list | None = None,
                positions: torch.Tensor | None = None, return_logits: bool = False,
                last_only: bool = False, logits_at: torch.Tensor | None = None) -> LMOutput:
        """Logits (batch, seq, vocab) without `targets`; with them the loss, from the fused chunked
        cross-entropy (the full logits are not formed unless `return_logits`). Generation passes
        `kv_caches` (one per block, from `new_kv_caches`) and the tokens' `positions` (batch, seq);
        `last_only` keeps the last position's logits; `logits_at`, a boolean (batch, seq) mask, only the
        logits of those positions, as (selected, vocab) in row-major order (scoring continuations)."""
        x = self.embed(idx)
        aux_total = x.new_zeros((), dtype=torch.float32)
        auxes = []
        for i, block in enumerate(self.blocks):
            cache = kv_caches[i] if kv_caches else None
            x, aux = block(x, doc_ids=doc_ids, kv_cache=cache, positions=positions)
            if aux is not None:
                aux_total = aux_total + aux.loss
                moe_aux = aux.moe if isinstance(aux, MoDAux) else aux
                if moe_aux is not None:
                    auxes.append(moe_aux)
        h = self.norm(x)
        want_logits = targets is None or return_logits
        if logits_at is not None:
            h_out = h[logits_at]
        else:
            h_out = h[:, -1:] if last_only else h
        out = LMOutput(logits=self.lm_head(h_out) if want_logits else None,
                       aux_loss=aux_total, expert_load=[a.expert_load for a in auxes])
        if targets is not None:
            out.lm_loss = linear_cross_entropy(h, self.lm_head.weight, targets)
            out.loss = out.lm_loss + aux_total
            if auxes and self.training:
                out.moe_stats = _moe_stats(auxes)
        return out

    # ---- reporting ----
    def parameter_report(self) -> dict:
        """Total, embedding and active-per-token parameter counts (tied weights counted once)."""
        total = sum(p.numel() for p in self.parameters())
        inactive = 0.0
        for block in self.blocks:
            passes = 1.0  # the share of tokens that go through the block
            if isinstance(block, MixtureOfDepths):
                passes = block.capacity
                inactive += (1 - block.capacity) * sum(p.numel() for p in block.block.parameters())
            if isinstance(block.ffn, MixtureOfExperts):
                moe = block.ffn
                inactive += passes * (moe.num_experts - moe.top_k) * moe.expert_parameters_per_expert()
        return {"total": total, "active_per_token": round(total - inactive), "embedding": self.embed.weight.numel()}

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 * active non-embedding params, plus the token mixing that parameters do
        not count: 12 * d * seq per attention or (parallel) retention layer, the chunked scan per Mamba-2 layer."""
        rep = self.parameter_report()
        matmul_params = rep["active_per_token"] - (0 if self.config.tie_embeddings else rep["embedding"])
        mixing = 0.0
        for block in self.blocks:
            share = block.capacity ** 2 if isinstance(block, MixtureOfDepths) else 1.0
            inner = block.block if isinstance(block, MixtureOfDepths) else block
            if inner.mixer_name == "mamba":
                m = inner.mixer
                mixing += 6 * m.heads * (m.chunk * (m.d_state + m.head_dim) + 2 * m.head_dim * m.d_state)
            else:
                mixing += share * 12 * self.config.d_model * seq_len
        return 6 * matmul_params + mixing

    # ---- generation ----
    def new_kv_caches(self, batch: int, max_len: int | None = None, dtype: torch.dtype | None = None) -> list:
        """One generation cache per block: a static KV cache for attention, a fixed-size state for Mamba-2 and
        retention (those cannot roll back: see `config.stateful`)."""
        p = self.embed.weight
        return [block.new_cache(batch, max_len or self.config.max_seq_len, p.device, dtype or p.dtype)
                for block in self.blocks]

    @property
    def pads_independently(self) -> bool:
        """Prompts of several lengths may be prefilled together, padded at their ends (`ModelConfig`)."""
        return self.config.pads_independently

    def fuse_projections(self, transposed: bool = False) -> "TransformerLM":
        """Inference only: each attention's q/k/v, and each gated MLP's gate/up, multiplied as one matrix.
        `transposed`: every linear weight stored by input rows (`layers.stored_transposed`; the tied
        embedding shares the head's), the layout a device's capabilities ask for decoding, and the linears
        become `InferenceLinear`s (the product for that layout)."""
        for module in self.modules():
            if module is not self and hasattr(module, "fuse_projections"):
                module.fuse_projections(transposed)
        if transposed:
            for parent in list(self.modules()):
                for name, module in list(parent.named_children()):
                    if type(module) is nn.Linear and module.weight.is_contiguous():
                        module.weight = nn.Parameter(stored_transposed(module.weight), requires_grad=False)
                        setattr(parent, name, InferenceLinear.of(module))
            if self.config.tie_embeddings and type(self.lm_head) is InferenceLinear:
                self.embed.weight = self.lm_head.weight
        return self

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, eos: int | None = None,
                 use_cache: bool = True, generator: torch.Generator | None = None):
        """Sample `max_new_tokens` after `idx` (batch, seq); yields each new (batch, 1) token as it comes.

        temperature 0 is greedy. The context is the model's window: a prompt plus continuation longer
        than max_seq_len is refused (ValueError), never silently cut. With `use_cache` each step runs one
        token against the cached keys/values; without, the whole sequence is recomputed (the reference).
        Serving many sequences at once: `blueberry.inference.Engine`."""
        batch, length = idx.shape
        if length + max_new_tokens > self.config.max_seq_len:
            raise ValueError(f"prompt ({length} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                             f"context of {self.config.max_seq_len} tokens")
        caches = self.new_kv_caches(batch) if use_cache else None
        positions = torch.arange(length, device=idx.device).expand(batch, length)
        seq = idx
        for _ in range(max_new_tokens):
            if use_cache:
                logits = self(idx, kv_caches=caches, positions=positions, last_only=True).logits[:, -1]
            else:
                logits = self(seq).logits[:, -1]
            nxt = sample_next(logits, temperature, top_k, top_p, generator)
            seq = torch.cat([seq, nxt], dim=1)
            idx, positions = nxt, positions[:, -1:] + 1
            yield nxt
            if eos is not None and bool((nxt == eos).all()):
                return


class AdaptiveMoEMinimalLLM(TransformerLM):
    """The seed's Mixture-of-Experts language model (attention + MoE in every block, unless --layers)."""

    default_model_type = "moe"


class StandardTransformerLLM(TransformerLM):
    """Dense transformer with the same attention, norms and embeddings (unless --layers)."""

    default_model_type = "standard"


MODEL_CLASSES = {"moe": AdaptiveMoEMinimalLLM, "standard": StandardTransformerLLM}


def create_model(config, model_type: str | None = None) -> TransformerLM:
    """The model of `config` (a run's AdaptiveMoEModelConfig or a ModelConfig); `model_type` overrides its
    model_type. The model keeps only the ModelConfig: it knows nothing of data, optimizer or run."""
    model_config = model_config_of(config)
    model_type = model_type or model_config.model_type
    if model_type not in MODEL_CLASSES:
        raise ValueError(f"unknown model_type {model_type!r}; choose one of {', '.join(MODEL_CLASSES)}")
    if model_type != model_config.model_type:
        model_config = dataclasses.replace(model_config, model_type=model_type)
    return MODEL_CLASSES[model_type](model_config)
