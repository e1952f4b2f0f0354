"""Expert parallelism (`--expert-parallel N`), applied to a built model from outside (torchtitan's dp2ep).

The world's ranks form groups of N consecutive ranks (a device mesh: expert_dp x ep); within a group rank i
holds experts [i * E/N, (i + 1) * E/N) of every MoE layer, and the rest of the model stays data-parallel over
the whole world: DDP, or FSDP2 sharding it (`--parallel fsdp`; the experts are left out of FSDP2's shards,
their sharding is this one). A layer routes its own tokens as before and sorts them into aligned expert groups
(models/moe.py); `ExpertExchange` then sends each expert's rows to the rank that holds it and the results
back, with `all_to_all_single` (uneven splits, an autograd Function whose backward is the reverse exchange).
The router, balancing losses and capacity are each rank's own tokens', as in plain data parallelism.

Gradients: an expert's gradient arrives summed over its group's tokens; `sync_and_clip` sums it over the
ranks holding the same experts in the other groups and divides by the world size — DDP's mean — and the
clipping norm counts every expert once. Muon orthogonalises each rank's own experts (their parameters carry
RANK_LOCAL). Under DDP, for evaluation and sampling, `full_experts` puts every expert back on every rank (the
ranks may run different numbers of forwards); under FSDP2 they cannot, and tokens travel as in training. After
training `gather` does it for good. Checkpoints: under DDP one file of the plain model (the experts gathered);
under FSDP2 a sharded (DCP) one in which `as_dtensors` has declared each rank's experts its shard of the whole
(E, ...) tensor, so no rank gathers them and it resumes at any world size or degree, or without expert parallelism.
"""

from __future__ import annotations

import contextlib
import time

import torch
import torch.distributed as dist
import torch.nn as nn

from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import _CHECKPOINT_PREFIX

from ..errors import ConfigError

RANK_LOCAL = "_rank_local"  # set on parameters each rank holds its own part of (optimizers keep them local)
_EXPERT_WEIGHTS = ("w_up", "w_down")


class _AllToAll(torch.autograd.Function):
    """Rows to the ranks of `group` (`send` rows to each, `recv` from each); backward sends the gradients back."""

    @staticmethod
    def forward(ctx, x, send: list[int], recv: list[int], group):
        ctx.send, ctx.recv, ctx.group = send, recv, group
        out = x.new_empty((sum(recv),) + tuple(x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), recv, send, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        out = grad.new_empty((sum(ctx.send),) + tuple(grad.shape[1:]))
        dist.all_to_all_single(out, grad.contiguous(), ctx.send, ctx.recv, group=ctx.group)
        return out, None, None, None


class ExpertExchange:
    """A MoE layer's `run_experts` under expert parallelism: rows grouped by (global) expert in, the experts'
    outputs in the same order out, the experts computed on the ranks that hold them."""

    def __init__(self, moe, local_experts, group, degree: int, stats: dict):
        self.moe, self.local_experts, self.group, self.degree = moe, local_experts, group, degree
        self.stats = stats  # rows sent to other ranks and forward seconds spent exchanging (benchmarks/)

    @torch.compiler.disable  # host-side split sizes and collectives: compiled code runs up to here and on after
    def __call__(self, rows: torch.Tensor, group_sizes: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        n, per_rank = self.degree, self.moe.num_experts // self.degree
        started = time.perf_counter()
        sizes = group_sizes.to(torch.long)
        received = torch.empty_like(sizes)
        dist.all_to_all_single(received, sizes, group=self.group)  # my experts' row counts from every rank
        sizes, received = sizes.view(n, per_rank).tolist(), received.view(n, per_rank).tolist()
        send, recv = [sum(r) for r in sizes], [sum(r) for r in received]
        me = dist.get_rank(self.group)
        # rows to the other ranks, there and back (the backward pass mirrors both exchanges)
        self.stats["rows_sent"] = self.stats.get("rows_sent", 0) + sum(send) - send[me] + sum(recv) - recv[me]
        inbound = _AllToAll.apply(rows, send, recv, self.group)
        self.stats["exchange_s"] = self.stats.get("exchange_s", 0.0) + time.perf_counter() - started
        # arrived source-major (each source's rows by expert): regroup expert-major for the grouped matmuls
        pieces = inbound.split([s for source in received for s in source])
        order = [src * per_rank + e for e in range(per_rank) for src in range(n)]
        local_sizes = torch.tensor([sum(received[src][e] for src in range(n)) for e in range(per_rank)],
                                   device=group_sizes.device, dtype=group_sizes.dtype)
        out = self.local_experts(torch.cat([pieces[i] for i in order]), local_sizes, dtype)
        done = out.split([received[src][e] for e in range(per_rank) for src in range(n)])
        back = [done[e * n + src] for src in range(n) for e in range(per_rank)]
        started = time.perf_counter()
        result = _AllToAll.apply(torch.cat(back), recv, send, self.group)
        self.stats["exchange_s"] += time.perf_counter() - started
        return result


class ExpertParallel:
    """What `apply_expert_parallel` did to a model, and the collectives its training needs."""

    def __init__(self, layers: list, degree: int, mesh, world: int):
        self.layers, self.degree, self.mesh, self.world = layers, degree, mesh, world
        self.group = mesh.get_group("ep")  # the ranks that share the experts between them
        # the ranks holding the same experts, one in each group (none when there is one group)
        self.expert_dp_group = mesh.get_group("expert_dp") if world > degree else None
        self.rank_in_group = mesh.get_local_rank("ep")
        self.stats: dict = {}
        self.local: list[nn.Parameter] = []  # this rank's expert weights, as the optimizers hold them
        self.names: dict[str, int] = {}  # their names in state dicts (wrappers' prefixes removed): their dims

    def sync_and_clip(self, params, max_norm: float) -> torch.Tensor:
        """After the backward passes: experts' gradients to DDP's mean, then clip every gradient by the norm
        of the whole (each expert counted once). Returns the norm before clipping."""
        local = [p for p in self.local if p.grad is not None]
        for p in local:
            if self.expert_dp_group is not None:
                dist.all_reduce(p.grad, group=self.expert_dp_group)
            p.grad.div_(self.world)
        ids = {id(p) for p in local}
        shared = [p for p in params if p.grad is not None and id(p) not in ids]
        device = (local or shared)[0].grad.device
        expert_sq = _norm([p.grad for p in local], device) ** 2
        dist.all_reduce(expert_sq, group=self.group)  # each group holds every expert once
        norm = (_norm([p.grad for p in shared], device) ** 2 + expert_sq).sqrt()
        for part in (shared, local):  # apart: FSDP2's gradients are DTensors, the experts' plain tensors
            torch.nn.utils.clip_grads_with_norm_(part, max_norm, norm)
        return norm

    def as_dtensors(self, flat: dict) -> list[str]:
        """Declare, in place, the entries of a DCP state dict (`model.NAME`, `optim.I.state.NAME.KEY`) that hold
        this rank's experts as DTensors: its shard (dim 0) of the whole tensor, replicated over the groups. DCP
        then writes each expert once and reads into any layout. The DTensors share the tensors' storage, so a
        load fills them; returns the keys wrapped (`plain_tensors` undoes it)."""
        from torch.distributed.tensor import DTensor, Replicate, Shard

        wrapped = []
        for key, t in flat.items():
            name = key[len("model."):] if key.startswith("model.") else key.split(".state.", 1)[-1].rsplit(".", 1)[0]
            if name in self.names and _per_expert(t, self.names[name]) and not isinstance(t, DTensor):
                flat[key] = DTensor.from_local(t, self.mesh, [Replicate(), Shard(0)], run_check=False)
                wrapped.append(key)
        return wrapped

    @staticmethod
    def plain_tensors(flat: dict, keys: list[str]) -> None:
        for key in keys:
            flat[key] = flat[key].to_local()

    def _gather_full(self, local: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(local) for _ in range(self.degree)]
        dist.all_gather(parts, local.detach().contiguous(), group=self.group)
        return torch.cat(parts)

    @contextlib.contextmanager
    def full_experts(self):
        """Every expert on every rank for the duration (a collective): the plain model's forward and state."""
        saved = [(moe, dict(moe._parameters), moe.run_experts) for moe in self.layers]
        try:
            for moe, params, _ in saved:
                for name in _EXPERT_WEIGHTS:
                    moe._parameters[name] = nn.Parameter(self._gather_full(params[name]), requires_grad=False)
                del moe.run_experts  # the layer's own method again
            yield
        finally:
            for moe, params, exchange in saved:
                moe._parameters.update(params)
                moe.run_experts = exchange

    def gather(self) -> None:
        """Undo the transform for good (after training): every expert on every rank, local dispatch."""
        for moe in self.layers:
            for name in _EXPERT_WEIGHTS:
                setattr(moe, name, nn.Parameter(self._gather_full(getattr(moe, name))))
            moe.__dict__.pop("run_experts", None)
        self.layers, self.local, self.names = [], [], {}

    def slice_optimizer_states(self, optimizers, states: list[dict]) -> list[dict]:
        """Full optimizer states (a checkpoint's) cut to this rank's experts."""
        return [_map_expert_states(opt, sd, self, lambda t: self._mine(t)) for opt, sd in zip(optimizers, states)]

    def full_optimizer_states(self, optimizers) -> list[dict]:
        """This rank's optimizer states with every expert's (a collective: every rank calls it)."""
        return [_map_expert_states(opt, opt.state_dict(), self, self._gather_full) for opt in optimizers]

    def _mine(self, full: torch.Tensor) -> torch.Tensor:
        per_rank = full.shape[0] // self.degree
        return full[self.rank_in_group * per_rank:(self.rank_in_group + 1) * per_rank].clone()


def _norm(grads: list, device) -> torch.Tensor:
    """The 2-norm of `grads` as a plain float32 tensor on `device` (a DTensor's norm made whole; [] -> 0)."""
    norm = torch.nn.utils.get_total_norm(grads)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return norm.to(device).float()


def _per_expert(value, param_dim: int) -> bool:
    """A tensor of an expert weight's optimizer state that is laid out as the weight (E, ...), not a scalar."""
    return torch.is_tensor(value) and value.dim() == param_dim


def _map_expert_states(opt, state: dict, ep: ExpertParallel, fn) -> dict:
    """`state` (opt's state_dict layout) with `fn` applied to the per-expert tensors of the expert weights."""
    local = {id(p) for p in ep.local}
    index = {i: p for i, p in enumerate(p for g in opt.param_groups for p in g["params"])}
    out = {"state": {}, "param_groups": state["param_groups"]}
    for key, entry in state["state"].items():
        p = index.get(key)
        if p is not None and id(p) in local:
            entry = {k: fn(v) if _per_expert(v, p.dim()) else v for k, v in entry.items()}
        out["state"][key] = entry
    return out


def expert_degree(config, world_size: int) -> int:
    """The ways a run of `world_size` processes splits its experts (1: every rank holds them all)."""
    degree = config.training.expert_parallel
    return degree if world_size >= degree > 1 else 1


def expert_weights(model: nn.Module) -> list[nn.Parameter]:
    """Every MoE layer's expert weights (what expert parallelism splits)."""
    from ..models.moe import MixtureOfExperts

    return [getattr(m, name) for m in model.modules() if isinstance(m, MixtureOfExperts) for name in _EXPERT_WEIGHTS]


def check_expert_parallel(config, world_size: int) -> None:
    degree = config.training.expert_parallel
    if degree <= 1:
        return
    if world_size % degree:
        raise ConfigError("expert_parallel", f"--expert-parallel {degree} needs a world size that is a multiple of it "
                          f"(this run has {world_size} process(es)): launch with torchrun --nproc-per-node {degree}, or "
                          "give --expert-parallel 1")
    if config.model.num_experts % degree:
        raise ConfigError("expert_parallel", f"--expert-parallel {degree} must divide --num-experts "
                          f"({config.model.num_experts})")


def apply_expert_parallel(model: nn.Module, degree: int) -> ExpertParallel | None:
    """Keep this rank's experts of every MoE layer and exchange tokens with the others (a collective: every
    rank calls it, after the weights are loaded and before DDP or FSDP2 wraps the model)."""
    from torch.distributed.device_mesh import init_device_mesh

    from ..models.moe import MixtureOfExperts

    if degree <= 1:
        return None
    layers = [m for m in model.modules() if isinstance(m, MixtureOfExperts)]
    if not layers:
        raise ConfigError("expert_parallel", f"--expert-parallel {degree} needs MoE layers; this model has none "
                                             "(--model-type moe, or :moe in --layers)")
    world = dist.get_world_size()
    device_type = next(model.parameters()).device.type
    # rows: the groups of `degree` consecutive ranks; columns: the ranks holding the same experts
    mesh = init_device_mesh(device_type, (world // degree, degree), mesh_dim_names=("expert_dp", "ep"))
    ep = ExpertParallel(layers, degree, mesh, world)
    position = ep.rank_in_group
    for moe in layers:
        per_rank = moe.num_experts // degree
        for name in _EXPERT_WEIGHTS:
            full = getattr(moe, name)
            mine = nn.Parameter(full.detach()[position * per_rank:(position + 1) * per_rank].clone())
            if ep.expert_dp_group is not None:  # the copies of these experts in the other groups start equal
                dist.broadcast(mine.data, group_src=0, group=ep.expert_dp_group)
            setattr(mine, RANK_LOCAL, True)
            setattr(moe, name, mine)
            ep.local.append(mine)
        moe.run_experts = ExpertExchange(moe, moe.run_experts, ep.group, degree, ep.stats)
    # DDP and FSDP2 leave the experts alone (distributed.wrap_model): sync_and_clip synchronises their gradients
    mine = {name: p.dim() for name, p in model.named_parameters() if getattr(p, RANK_LOCAL, False)}
    from torch.nn.parallel import DistributedDataParallel as DDP

    DDP._set_params_and_buffers_to_ignore_for_model(model, list(mine))
    ep.names = {name.replace(_CHECKPOINT_PREFIX, ""): dim for name, dim in mine.items()}
    model._expert_parallel = ep
    return ep


def expert_parallel_of(model: nn.Module) -> ExpertParallel | None:
    return model.__dict__.get("_expert_parallel")
