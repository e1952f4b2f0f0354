"""`setup_optimizers(model, config)`: which parameters each optimizer owns, with which settings.

--optimizer muon (the hybrid): Muon for the hidden matrices (attention, retention and Mamba-2
  projections, MLP, stacked experts); AdamW at `adamw_lr` for embeddings, output head, norms, biases,
  the MoE and Mixture-of-Depths routers and predictor, and Mamba-2's convolution and A/dt/D (not
  matrices one would orthogonalise: a depthwise filter and per-head scalars).
--optimizer adamw | lion | adafactor: that optimizer for everything at `lr`.
Weight decay applies to matrices only; norms, biases and embeddings never decay.
"""

from __future__ import annotations

import torch

from ..logs import get_logger
from .lion import Lion
from .muon import MuonWithWarmup

log = get_logger(__name__).info


def _fused_ok(params) -> bool:
    from torch.distributed.tensor import DTensor

    if any(isinstance(p, DTensor) for p in params):  # FSDP2 shards: let AdamW pick its own path
        return False
    return all(p.device.type in ("cuda", "cpu") and p.dtype in (torch.float32, torch.bfloat16, torch.float16)
               for p in params)


def split_parameters(model: torch.nn.Module) -> dict[str, list[tuple[str, torch.nn.Parameter]]]:
    """Named parameters by role: hidden (matrices inside blocks), embed, head, router, scalar (norms, biases,
    convolution filters, state-space scalars)."""
    groups = {"hidden": [], "embed": [], "head": [], "router": [], "scalar": []}
    seen = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if name.startswith("embed"):
            groups["embed"].append((name, p))
        elif name.startswith("lm_head"):
            groups["head"].append((name, p))
        elif "router" in name or "shared_gate" in name or ".predictor." in name:
            groups["router"].append((name, p))
        elif p.dim() >= 2 and ".conv." not in name:
            groups["hidden"].append((name, p))
        else:
            groups["scalar"].append((name, p))
    return groups


def _adamw(groups, config, lr):
    from torch.distributed.tensor import DTensor

    params = [p for g in groups for p in g["params"]]
    sharded = {isinstance(p, DTensor) for p in params}
    # FSDP2's DTensors beside plain tensors (expert parallelism's experts): no multi-tensor kernel takes both
    foreach = False if len(sharded) == 2 else None
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(config.optim.adamw_betas), eps=1e-8,
                             fused=_fused_ok(params) or None, foreach=foreach)


def setup_optimizers(model: torch.nn.Module, config, distributed: bool = False) -> list[torch.optim.Optimizer]:
    parts = split_parameters(model)
    p = lambda role: [param for _, param in parts[role]]  # noqa: E731
    wd = config.optim.weight_decay
    if config.optim.optimizer == "muon":
        # an expert's gated up-projection holds [gate; up]: orthogonalised as two matrices, like the
        # dense MLP's separate gate and up (so MoE-vs-dense ablations treat them alike)
        hidden, gated_up = [], []
        for name, q in parts["hidden"]:
            (gated_up if config.model.mlp_type == "swiglu" and name.endswith("ffn.w_up") else hidden).append(q)
        muon_groups = [g for g in ({"params": hidden, "name": "hidden"},
                                   {"params": gated_up, "row_blocks": 2, "name": "expert gate/up"}) if g["params"]]
        muon = MuonWithWarmup(muon_groups, lr=config.optim.lr, momentum=config.optim.muon_momentum,
                              momentum_start=config.optim.muon_momentum_start,
                              momentum_warmup_steps=config.optim.momentum_warmup_steps, weight_decay=wd,
                              scale_mode=config.optim.muon_update_scale, distributed=distributed,
                              # bf16 Newton-Schulz as designed; --no-amp asks for fp32 everywhere
                              ns_dtype=torch.bfloat16 if config.training.use_amp else torch.float32)
        adam_groups = [g for g in (
            {"params": p("embed") + p("head"), "weight_decay": 0.0, "name": "embed/head"},
            {"params": p("router") + p("scalar"), "weight_decay": 0.0, "name": "router/norms/biases"},
        ) if g["params"]]
        optimizers = [muon, _adamw(adam_groups, config, config.optim.adamw_lr)]
        log(f"Optimizers: Muon lr={config.optim.lr} on {_count(p('hidden'))} params (hidden matrices); "
            f"AdamW lr={config.optim.adamw_lr} on {_count(p('embed') + p('head') + p('router') + p('scalar'))} "
            "params (embeddings, head, router, norms)")
        return optimizers
    decay = p("hidden") + p("head") + p("router")
    no_decay = p("embed") + p("scalar")
    groups = [g for g in ({"params": decay, "weight_decay": wd, "name": "matrices"},
                          {"params": no_decay, "weight_decay": 0.0, "name": "embeddings/norms"}) if g["params"]]
    if config.optim.optimizer == "adamw":
        opt = _adamw(groups, config, config.optim.lr)
    elif config.optim.optimizer == "lion":
        opt = Lion(groups, lr=config.optim.lr, betas=(0.9, 0.99))
    elif config.optim.optimizer == "adafactor":
        opt = torch.optim.Adafactor(groups, lr=config.optim.lr)
    else:
        raise ValueError(f"unknown optimizer {config.optim.optimizer!r}")
    log(f"Optimizer: {type(opt).__name__} lr={config.optim.lr} on {_count(decay + no_decay)} params")
    return [opt]


def _count(params) -> str:
    return f"{sum(x.numel() for x in params):,}"
