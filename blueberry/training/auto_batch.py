"""Automatic micro-batch size on GPUs: the largest micro-batch that fits, then gradient accumulation.

Probe with real training steps (forward, backward, optimizer) from the configured batch downward,
halving on out-of-memory; then accumulate enough micro-batches to keep the configured tokens per
optimizer step. Runs only when the user left batch_size unset ("auto") and the device is a GPU.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from ..logs import quiet


def largest_fitting_batch(try_step: Callable[[int], None], start: int, minimum: int = 1) -> int:
    """Halve from `start` until `try_step(batch)` runs without an out-of-memory error."""
    batch = start
    while batch >= minimum:
        try:
            try_step(batch)
            return batch
        except torch.cuda.OutOfMemoryError:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            batch //= 2
    raise RuntimeError(f"even a micro-batch of {minimum} does not fit in device memory; use a smaller model")


def plan_accumulation(target_batch: int, micro_batch: int) -> int:
    return math.ceil(target_batch / micro_batch)


def auto_batch_size(model, config, device, precision) -> tuple[int, int]:
    """(micro_batch, grad_accum_steps) keeping batch_size * grad_accum_steps sequences per step."""
    from ..optimizers import setup_optimizers

    target = config.training.batch_size * config.training.grad_accum_steps
    with quiet():  # the probe's optimizers, thrown away
        optimizers = setup_optimizers(model, config)

    def try_step(batch: int) -> None:
        idx = torch.randint(0, config.model.vocab_size, (batch, config.model.max_seq_len), device=device)
        with precision.autocast():
            loss = model(idx, idx).loss
        loss.backward()
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)

    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    try:
        micro = largest_fitting_batch(try_step, config.training.batch_size)
    finally:
        model.load_state_dict(state)  # the probe's updates are thrown away
        del optimizers
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return micro, plan_accumulation(target, micro)
