"""Muon: momentum SGD whose update is orthogonalised by a quintic Newton-Schulz iteration.

For each weight matrix G (or each matrix of a stacked 3-D expert weight; a param group's `row_blocks`
n > 1 reads each matrix as n matrices stacked by rows, e.g. an expert's [gate; up]):
    buf   <- momentum * buf + (1 - momentum) * grad
    upd   <- grad + momentum * (buf - grad)        (Nesterov; plain: upd = buf)
    O     <- NewtonSchulz5(upd)                    (~ U V^T of upd's SVD; singular values in ~[0.7, 1.2])
    W     <- W * (1 - lr * weight_decay) - lr * scale * O
scale = max(1, rows / cols) ** 0.5 ("shape"), or 0.2 * sqrt(max(rows, cols)) ("adamw": matches
AdamW's update RMS so AdamW learning rates carry over).

Distributed (`distributed=True` with an initialised process group): gradients are already equal on
every rank (DDP averaged them), so every rank keeps the same momentum; the expensive Newton-Schulz is
split: rank r orthogonalises matrices r, r + world, ... and the results are all-gathered, so each
rank applies every update and the weights stay identical.
Parameters marked `_rank_local` (expert parallelism's experts: each rank its own) are orthogonalised on
their rank, without the split. Under FSDP2 parameters, gradients and momenta are sharded DTensors: each momentum-updated matrix is
all-gathered whole (`full_tensor`), orthogonalised, and each rank keeps its own shard of the result.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, distribute_tensor

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def zeropower_via_newtonschulz5(G: torch.Tensor, steps: int = 5, eps: float = 1e-7,
                                dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Approximately orthogonalise the last two dims of G (batched over any leading dims).

    Each iteration is X <- a X + (b A + c A A) X with A = X X^T, written as two fused `baddbmm`s on a
    contiguous wide X (`benchmarks/newton_schulz.py` times it against the textbook form)."""
    a, b, c = NS_COEFFICIENTS
    shape = G.shape
    X = G.to(dtype).reshape(-1, shape[-2], shape[-1])
    transposed = X.size(-2) > X.size(-1)
    if transposed:
        X = X.mT
    X = (X / (X.norm(dim=(-2, -1), keepdim=True) + eps)).contiguous()
    for _ in range(steps):
        A = torch.bmm(X, X.mT)
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)
        X = torch.baddbmm(X, B, X, beta=a)
    if transposed:
        X = X.mT
    return X.reshape(shape)


def update_scale(shape: torch.Size, mode: str = "shape") -> float:
    rows, cols = shape[-2], shape[-1]
    if mode == "adamw":
        return 0.2 * max(rows, cols) ** 0.5
    return max(1.0, rows / cols) ** 0.5


class Muon(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True,
                 weight_decay: float = 0.0, ns_steps: int = 5, scale_mode: str = "shape",
                 distributed: bool = False, ns_dtype: torch.dtype = torch.bfloat16, batch_parameters: bool = True):
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                        ns_steps=ns_steps, scale_mode=scale_mode, row_blocks=1)
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() < 2:
                    raise ValueError(f"Muon handles matrices (2-D or stacked 3-D); got a {p.dim()}-D parameter")
        self.distributed = distributed
        self.ns_dtype = ns_dtype
        self.batch_parameters = batch_parameters  # False: one Newton-Schulz call per parameter
        for group in self.param_groups:  # eager state: checkpoint helpers never need a dummy step
            for p in group["params"]:
                self.state[p]["momentum_buffer"] = torch.zeros_like(p)

    def _momentum_update(self, p: torch.Tensor, group: dict) -> torch.Tensor:
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p)
        buf = state["momentum_buffer"]
        grad = p.grad
        buf.lerp_(grad, 1 - group["momentum"])
        return grad.lerp(buf, group["momentum"]) if group["nesterov"] else buf

    def _newton_schulz(self, upd: torch.Tensor, group: dict) -> torch.Tensor:
        """NS of each matrix; with `row_blocks` n > 1 each matrix is n stacked matrices (an expert's
        [gate; up]) orthogonalised one by one, as the dense MLP's separate gate and up are."""
        blocks = group["row_blocks"]
        if blocks == 1:
            return zeropower_via_newtonschulz5(upd, steps=group["ns_steps"], dtype=self.ns_dtype)
        shape = upd.shape
        split = upd.reshape(*shape[:-2], blocks, shape[-2] // blocks, shape[-1])
        return zeropower_via_newtonschulz5(split, steps=group["ns_steps"], dtype=self.ns_dtype).reshape(shape)

    def _orthogonalised(self, upd: torch.Tensor, group: dict) -> torch.Tensor:
        if isinstance(upd, DTensor):  # FSDP2 shard: orthogonalise the whole matrix, keep our shard
            full = self._newton_schulz(upd.full_tensor(), group)
            return distribute_tensor(full.to(upd.dtype), upd.device_mesh, upd.placements, src_data_rank=None)
        return self._newton_schulz(upd, group)

    def _orthogonalised_together(self, updates: list[torch.Tensor], group: dict) -> list[torch.Tensor]:
        """Same-shape updates (2-D matrices, or 3-D stacks of expert matrices from every layer) joined into
        one batched Newton-Schulz. Each matrix is normalised on its own, so the result equals one call per
        parameter, in fewer, larger kernels (`benchmarks/newton_schulz.py`, `benchmarks/muon_step.py`)."""
        if len(updates) == 1 or not self.batch_parameters:
            return [self._orthogonalised(u, group) for u in updates]
        joined = torch.stack([u.to(self.ns_dtype) for u in updates])
        return list(self._newton_schulz(joined, group).unbind(0))

    @staticmethod
    def _apply(p: torch.Tensor, ortho: torch.Tensor, group: dict) -> None:
        p.mul_(1 - group["lr"] * group["weight_decay"])
        rows, cols = p.shape[-2] // group["row_blocks"], p.shape[-1]
        p.add_(ortho.to(p.dtype), alpha=-group["lr"] * update_scale((rows, cols), group["scale_mode"]))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        use_dist = self.distributed and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            updates = [self._momentum_update(p, group) for p in params]
            if any(isinstance(p, DTensor) for p in params):
                for p, upd in zip(params, updates):
                    self._apply(p, self._orthogonalised(upd, group), group)
            else:
                # split across ranks: the parameters every rank holds alike; a rank's own ones (expert
                # parallelism's experts, `_rank_local`) and everything in one process are orthogonalised here
                split = [use_dist and not getattr(p, "_rank_local", False) for p in params]
                if use_dist:
                    self._distributed_apply(*_pick(params, updates, split, True), group)
                self._local_apply(*_pick(params, updates, split, False), group)
        return loss

    def _local_apply(self, params, updates, group) -> None:
        for indices in _by_shape(params).values():
            orthos = self._orthogonalised_together([updates[i] for i in indices], group)
            for i, ortho in zip(indices, orthos):
                self._apply(params[i], ortho, group)

    def _distributed_apply(self, params, updates, group) -> None:
        world, rank = dist.get_world_size(), dist.get_rank()
        for indices in _by_shape(params).values():  # all_gather moves equal-sized tensors
            for start in range(0, len(indices), world):
                chunk = indices[start:start + world]
                mine = chunk[rank] if rank < len(chunk) else None
                local = (self._orthogonalised(updates[mine], group) if mine is not None
                         else torch.zeros_like(updates[chunk[0]], dtype=self.ns_dtype))
                gathered = [torch.empty_like(local) for _ in range(world)]
                dist.all_gather(gathered, local.contiguous())
                for owner, i in enumerate(chunk):
                    self._apply(params[i], gathered[owner], group)


def _pick(params: list, updates: list, flags: list[bool], value: bool) -> tuple[list, list]:
    """The parameters (and their updates) whose flag is `value`."""
    return ([p for p, f in zip(params, flags) if f == value], [u for u, f in zip(updates, flags) if f == value])


def _by_shape(params: list[torch.Tensor]) -> dict[tuple, list[int]]:
    """Indices of `params` grouped by shape, in first-seen order."""
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(params):
        groups.setdefault(tuple(p.shape), []).append(i)
    return groups


class MuonWithWarmup(Muon):
    """Muon whose momentum rises linearly from `momentum_start` to `momentum` over
    `momentum_warmup_steps` optimizer steps (the count is kept in the param groups, so it resumes)."""

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, momentum_start: float = 0.85,
                 momentum_warmup_steps: int = 300, **kwargs):
        super().__init__(params, lr=lr, momentum=momentum, **kwargs)
        for group in self.param_groups:
            group.setdefault("momentum_target", momentum)
            group.setdefault("momentum_start", momentum_start)
            group.setdefault("momentum_warmup_steps", momentum_warmup_steps)
            group.setdefault("steps_taken", 0)
            self._set_momentum(group)

    @staticmethod
    def _set_momentum(group: dict) -> None:
        warm = group["momentum_warmup_steps"]
        frac = 1.0 if warm == 0 else min(1.0, group["steps_taken"] / warm)
        group["momentum"] = group["momentum_start"] + frac * (group["momentum_target"] - group["momentum_start"])

    @torch.no_grad()
    def step(self, closure=None):
        loss = super().step(closure)
        for group in self.param_groups:
            group["steps_taken"] += 1
            self._set_momentum(group)
        return loss
