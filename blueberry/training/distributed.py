"""Process-group set-up for `torchrun` and how the model is wrapped (DDP or FSDP2).

The model itself knows nothing of this: `wrap_model` applies PyTorch's own engines from outside.
Backend: nccl on CUDA, gloo on CPU. Rendezvous comes from torchrun's environment variables.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        """Every rank reaches this point (an all-reduce we wait on; see `teardown` for why not dist.barrier)."""
        self.all_reduce_sum([0.0])

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        """Element-wise sums over ranks, in float64, in one collective (the values unchanged on one process)."""
        if not self.enabled:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64)
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t, async_op=True).wait()
        return t.cpu().tolist()

    def all_reduce_mean(self, value: float) -> float:
        return self.all_reduce_sum([value])[0] / self.world_size


def init_distributed(device_type: str) -> DistContext:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); else a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend)
    return DistContext(rank=rank, world_size=world, local_rank=local_rank, local_world_size=local_world)


def wrap_model(model: torch.nn.Module, ctx: DistContext, parallel: str, precision_dtype=None):
    """DDP or FSDP2 (`fully_shard` per block, then the root) when running on several processes. Expert
    parallelism's experts (marked RANK_LOCAL) are each rank's own: neither engine shards or reduces them."""
    if not ctx.enabled:
        return model
    if parallel == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        from .expert_parallel import RANK_LOCAL

        mp = MixedPrecisionPolicy(param_dtype=precision_dtype, reduce_dtype=torch.float32) if precision_dtype else None
        kwargs = {"mp_policy": mp} if mp else {}
        experts = {p for p in model.parameters() if getattr(p, RANK_LOCAL, False)}
        if experts:
            kwargs["ignored_params"] = experts
        for block in model.blocks:
            fully_shard(block, **kwargs)
        fully_shard(model, **kwargs)
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    device_ids = [ctx.local_rank] if next(model.parameters()).is_cuda else None
    return DDP(model, device_ids=device_ids)


def no_sync(model, active: bool):
    """Skip DDP's gradient all-reduce on micro-steps that are not the last of an accumulation."""
    if active and hasattr(model, "no_sync"):
        return model.no_sync()
    if active and hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(False)
        return _restore_sync(model)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _restore_sync(model):
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def unwrap(model):
    """The plain model inside torch.compile and DDP wrappers (FSDP2 shards in place: nothing to unwrap)."""
    while hasattr(model, "_orig_mod") or hasattr(model, "module"):
        model = getattr(model, "_orig_mod", None) or model.module
    return model


def teardown(ctx: DistContext) -> None:
    """Leave the process group so that the process can always exit.

    Call it only once the DDP/compile wrappers are unreferenced. Why the order matters: a DDP
    `Reducer` holds a reference to the process group. Freed after `destroy_process_group` (when the
    wrapper is dropped later), the reducer's release is the group's last reference, so its destructor
    joins gloo's worker thread from the main thread while holding the GIL; a worker still releasing a
    finished collective's tensor waits for the GIL, and the process never exits. Here the wrappers are
    collected first (the group outlives them), every rank passes an all-reduce whose work we waited on,
    and only then is the group destroyed, with no collective in flight."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    import gc

    torch._dynamo.reset()  # compiled graphs' guards can keep the wrapped module alive
    gc.collect()
    ctx.barrier()
    dist.destroy_process_group()
    gc.collect()


def exit_process(code: int) -> None:
    """End a torchrun rank without the interpreter's finalization (entry points only, never a library call).

    Why: after `teardown`, gloo's worker threads can still be dropping a finished collective's tensors;
    a thread that asks for the GIL while the interpreter finalizes is unwound by CPython, and the C++
    frame it unwinds through calls std::terminate ("terminate called without an active exception",
    SIGABRT) although every rank finished its work. Output is flushed first, so nothing is lost; files
    the run wrote are closed by then. A single process (no WORLD_SIZE > 1) exits normally."""
    import logging
    import sys

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        sys.exit(code)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def is_sharded(model) -> bool:
    """True when FSDP2 has turned the parameters into DTensors."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def gathered_states(model, optimizers) -> tuple:
    """Full (unsharded) model and optimizer state dicts; a collective: every rank must call it. (Checkpoints
    of FSDP2 runs are sharded instead, see sharded_checkpoint.py; `benchmarks/checkpoint_save.py` compares.)"""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(model, options=options)
    optim_states = [get_optimizer_state_dict(model, opt, options=options) for opt in optimizers]
    return model_state, optim_states


def load_full_optimizer_states(model, optimizers, states) -> None:
    """Full (unsharded) optimizer states into the optimizers of `model`, sharded by FSDP2 or not. States keyed
    by parameter name (a gathered FSDP2 state) load as they are; states keyed by index (a single process's or
    DDP's `state_dict()`) are renamed first, index i being the i-th parameter of this run's optimizer."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                         set_optimizer_state_dict)

    options = StateDictOptions(full_state_dict=True)
    for opt, state in zip(optimizers, states):
        if keyed_by_index(state):
            state = _keyed_by_name(state, get_optimizer_state_dict(model, opt))
        set_optimizer_state_dict(model, opt, state, options=options)


def keyed_by_index(state: dict) -> bool:
    """True for an optimizer state dict as `Optimizer.state_dict()` makes it (parameters numbered, not named)."""
    return any(isinstance(p, int) for g in state.get("param_groups", []) for p in g["params"])


def _keyed_by_name(state: dict, live: dict) -> dict:
    names = [n for g in live["param_groups"] for n in g["params"]]
    numbers = [i for g in state["param_groups"] for i in g["params"]]
    rename = dict(zip(numbers, names))  # equal lengths: check_optimizer_layout has compared the groups
    return {"state": {rename[k]: v for k, v in state["state"].items()},
            "param_groups": [{**g, "params": [rename[i] for i in g["params"]]} for g in state["param_groups"]]}


def scalar(value) -> float:
    """A Python float from a tensor that may be a sharded DTensor."""
    if hasattr(value, "full_tensor"):
        value = value.full_tensor()
    return float(value)
