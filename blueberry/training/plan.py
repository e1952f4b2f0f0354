"""What a run will do, said before it does it (`python train.py ... --dry-run` prints only this): the device
and precision, the model and its parameters, the batch and the training tokens, the optimizer and its
learning rates, and the memory per device — weights, gradients, optimizer states, activations with the
activation checkpointing the run would use, and what FSDP shards. The model is built on PyTorch's meta
device, so a preset too large for this machine is described without allocating it.

Under torchrun the world size is torchrun's; `WORLD_SIZE=N` sets it for a dry run; a named GPU preset is
described on the hardware it is named for (`configs.presets.PRESET_HARDWARE`: its memory per GPU and its
GPU count) and checked against it.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch

from ..configs.presets import PRESET_HARDWARE
from ..logs import quiet
from ..models import create_model
from .budget import planning
from .expert_parallel import check_expert_parallel, expert_degree
from .memory import GIB, choose_checkpointing, estimate


def _least_fitting(model, config, world_size: int, memory_bytes: float, device_type: str) -> tuple[str, dict]:
    """The checkpointing the run would use (the given one, else the least that fits) and its estimate."""
    mode = config.training.activation_checkpointing
    if "activation_checkpointing" in config.auto_fields:
        mode = choose_checkpointing(model, config, None, world_size, available=memory_bytes, device_type=device_type)
    return mode, estimate(model, config, world_size, mode, device_type)


@dataclass
class _DryRunRanks:
    """The process group a dry run describes, without one: rank 0's figures are everyone's."""
    world_size: int
    rank: int = 0
    is_main: bool = True

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        return list(values)


def _plan_by_budget(config, world_size: int) -> list[str]:
    """A run with a time budget: its data is read (prepared on first use, as the run would) and its size
    chosen as the run would choose it (where the compute decides, by timing a step here); the steps are
    settled by the run's probe."""
    from .budget import budget_seconds
    from .run import build_data, resolve_device
    from .size_plan import PROBE_STEPS, plan_size

    notes: list[str] = []
    with quiet():
        _, corpus, _, _ = build_data(config)
    plan = plan_size(config, corpus.n_train, _DryRunRanks(world_size), resolve_device(config), time.time(),
                     budget_seconds(config), notes.append)
    return [f"  budget        {budget_seconds(config):.0f} s for the whole command; the steps are set after a "
            f"{PROBE_STEPS + 1}-step probe to end within it, at most {plan['data_steps']:,} "
            f"({plan['data_steps'] * plan['tokens_per_step'] / max(1, plan['unique_tokens']):.2f} passes over "
            f"{plan['unique_tokens']:,} training tokens)"] + [f"  size          {n[len('Plan: '):]}" for n in notes]


def describe_plan(config, preset: str | None = None, world_size: int | None = None) -> list[str]:
    """The plan's lines (what `--dry-run` prints)."""
    hardware = PRESET_HARDWARE.get(preset or "")
    world_size = world_size or int(os.environ.get("WORLD_SIZE", hardware[1] if hardware else 1))
    budget_lines = _plan_by_budget(config, world_size) if planning(config) else []
    check_expert_parallel(config, world_size)
    caps = config.capabilities()
    with torch.device("meta"):
        model = create_model(config)
    rep = model.parameter_report()
    m, t, o = config.model, config.training, config.optim
    tokens_per_step = t.batch_size * t.grad_accum_steps * m.max_seq_len * world_size
    memory_gb = hardware[0] if hardware else caps.memory_gb
    mode, e = _least_fitting(model, config, world_size, memory_gb * GIB, "cuda" if hardware else caps.device_type)
    sharded = [what for what, on in (("weights, gradients and optimizer states sharded by FSDP2",
                                      t.parallel == "fsdp" and world_size > 1),
                                     (f"experts split {t.expert_parallel} ways", expert_degree(config, world_size) > 1))
               if on]
    fp8 = "auto (measured at start)" if t.use_fp8 and "use_fp8" in config.auto_fields else "on" if t.use_fp8 else "off"
    lines = [
        "Plan",
        f"  device        {caps.device_name} ({caps.device_type}), {world_size} process(es), precision "
        f"{'bf16/fp16 autocast' if t.use_amp else 'fp32'}, FP8 {fp8}, "
        f"compile {'on' if t.compile else 'off'}",
        f"  model         {m.model_type if m.layers is None else m.layers}, d_model {m.d_model} x "
        f"{m.n_layers} layers, {m.n_heads} heads; {rep['total']:,} parameters, "
        f"{rep['active_per_token']:,} active per token",
        f"  batch         {t.batch_size} sequences x {m.max_seq_len} tokens x {t.grad_accum_steps} "
        f"accumulation x {world_size} process(es) = {tokens_per_step:,} tokens per step",
        f"  length        {'at most ' if budget_lines else ''}{t.max_steps:,} steps = "
        f"{tokens_per_step * t.max_steps:,} training tokens"
        + (f", in each of {t.ensemble} runs averaged into one model (--ensemble)" if t.ensemble > 1 else ""),
        f"  optimizer     {o.optimizer}, lr {o.lr:g}" + (f", AdamW part {o.adamw_lr:g}" if o.optimizer == "muon"
                                                         else "")
        + f", {o.schedule} with {o.warmup_steps} warm-up steps, weight decay {o.weight_decay:g}",
        f"  memory/device weights {e['weights'] / GIB:.2f} GiB, gradients {e['gradients'] / GIB:.2f}, optimizer "
        f"{e['optimizer'] / GIB:.2f}, activations {e['activations'] / GIB:.2f} (checkpointing {mode}) = "
        f"{e['total'] / GIB:.2f} GiB" + (f" ({'; '.join(sharded)})" if sharded else ""),
    ]
    lines[4:4] = budget_lines
    if hardware:
        fits = e["total"] <= hardware[0] * GIB
        lines.append(f"  hardware      preset {preset} is for {hardware[1]} x {hardware[0]} GB: "
                     f"{'fits' if fits else 'does NOT fit'} by the estimate")
    return lines
