"""Activation checkpointing applied to a built model from outside, as torchtitan does: each block is
wrapped in PyTorch's `checkpoint_wrapper` (non-reentrant `torch.utils.checkpoint`), so the model code knows
nothing of it, and it composes with FSDP2 (applied after it, per block) and torch.compile.

  none       every block keeps what its backward needs (the fastest, the most memory)
  selective  per op: the outputs of the matmuls (linear projections, attention, grouped expert matmuls,
             FP8 matmuls) are kept; everything cheap between them (norms, activations, rotary embeddings,
             routing, elementwise ops) is recomputed in the backward pass
  full       only each block's input is kept; the whole block runs again in the backward pass

Recomputation replays the same random numbers (the RNG state is saved with the block's input), so losses
and gradients equal those without checkpointing. State dicts keep their names: the wrapper's prefix is
removed on save and added on load by the wrapper itself.
"""

from __future__ import annotations

from functools import partial

import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from ..configs.fields import ACTIVATION_CHECKPOINTING as MODES

_aten = torch.ops.aten
# ops whose outputs selective checkpointing keeps: the expensive ones
_KEEP = {getattr(_aten, name) for name in (
    "mm", "addmm", "bmm", "baddbmm", "_grouped_mm", "_scaled_mm", "_scaled_grouped_mm",
    "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu",
) if hasattr(_aten, name)}


def _keep_matmuls(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    # `op` is an overload (aten.mm.default); _KEEP holds the packets (aten.mm), every overload of each
    kept = getattr(op, "overloadpacket", op) in _KEEP
    return CheckpointPolicy.MUST_SAVE if kept else CheckpointPolicy.PREFER_RECOMPUTE


def apply_activation_checkpointing(model: torch.nn.Module, mode: str) -> torch.nn.Module:
    """Wrap every block of `model` (in place) for `mode`; before FSDP2 and compile."""
    if mode not in MODES:
        raise ValueError(f"activation checkpointing must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "none":
        return model
    extra = {} if mode == "full" else {"context_fn": partial(create_selective_checkpoint_contexts, _keep_matmuls)}
    for i, block in enumerate(model.blocks):
        model.blocks[i] = checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT,
                                             preserve_rng_state=True, **extra)
    return model
