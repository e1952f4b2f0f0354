"""Before a budgeted run builds its model: its size, when left to the run, and its provisional length.

Where the data bounds the model below the device's default size, the data decides (training.sizing: a few
passes, about a token per parameter; a dense model where the model type is left to the run). Where the
corpus allows more, the compute decides: the device default's forward and backward are timed (eager, a
small micro-batch; rank 0's figure, times the processes) and the rule picks the largest size the rest of
the budget trains on its tokens. The length is provisional — the tokens the rule allows — until the
probe settles it (training.budget); the warm-up is fixed here, so that the probe's steps have the learning
rates of the final plan.
"""

from __future__ import annotations

import time

import torch

from .sizing import (
    MAX_DEPTH,
    MAX_EPOCHS,
    MIN_TOKENS_PER_PARAM,
    Candidate,
    choose_size,
    data_limited_depth,
    shape_for_depth,
    tokens_for,
)

PROBE_STEPS = 8  # training steps timed before the length is settled (after the first, which compiles)
# The share of the budget left at planning time that the size choice gives to training steps (the rest: the
# evaluations, the final scoring, compilation); the probe then plans the steps from measured figures.
TRAINING_SHARE = 0.85
# Sequences of the micro-batch `measure_flops` times (at most): enough to fill the device, small enough to fit
# where the run's own micro-batch is only found to fit later (auto batch size).
FLOPS_PROBE_BATCH = 8


def size_is_auto(config) -> bool:
    """Whether the model's size is left to the run (no size given, no --layers pattern, no --init-from)."""
    return (config.model.layers is None and not config.training.init_from
            and all(f in config.auto_fields for f in ("d_model", "n_layers", "n_heads", "n_kv_heads")))


def candidates(config, depths, past=None) -> list[Candidate]:
    """The family's sizes, built on the meta device (nothing allocated). `past(candidate)`: the first size for
    which it holds is the last built (sizes grow with depth: none beyond it can be chosen)."""
    from ..models import create_model

    out = []
    for depth in depths:
        shaped = config.replace(**shape_for_depth(depth), d_ff=_d_ff(config, depth))
        with torch.device("meta"):
            model = create_model(shaped)
        rep = model.parameter_report()
        out.append(Candidate(depth, rep["total"] - rep["embedding"], model.flops_per_token(config.model.max_seq_len)))
        if past is not None and past(out[-1]):
            break
    return out


def _d_ff(config, depth: int) -> int:
    from ..configs.adaptive_moe_config import default_d_ff

    if "d_ff" not in config.auto_fields:
        return config.model.d_ff
    return default_d_ff(shape_for_depth(depth)["d_model"], config)


def plan_size(config, unique_tokens: int, ranks, device, started: float, budget: float, note) -> dict:
    """Choose the size (when left to the run), the provisional length and the warm-up; returns the plan's
    record so far. `ranks`: the process group (a DistContext); `started`: when the budget began."""
    plan = {"time_budget_s": budget, "unique_tokens": unique_tokens}
    if size_is_auto(config):
        depth, dense, why = _choose_depth(config, unique_tokens, ranks, device, started, budget, plan)
        _resize(config, depth, dense)
        plan["size_rule"] = why
        note(f"Plan: depth {depth} (d_model {config.model.d_model}, {config.model.model_type}): {why}")
    tokens_per_step = config.tokens_per_step * ranks.world_size
    params = _non_embedding_params(config)
    data_steps = max(PROBE_STEPS + 1, tokens_for(params, unique_tokens) // tokens_per_step)
    # provisional, as an automatic default is: `StepPlanner.settle` derives the final length
    config.training.max_steps = data_steps
    if "warmup_steps" in config.auto_fields:
        config.derive(warmup_steps=max(PROBE_STEPS + 1, min(100, data_steps // 20)))
    elif config.optim.warmup_steps < PROBE_STEPS + 1:
        note(f"Note: --warmup-steps {config.optim.warmup_steps} ends inside the {PROBE_STEPS + 1}-step probe; the "
             "steps after it follow the provisional length until the plan is settled")
    plan.update(params=params, data_steps=data_steps, tokens_per_step=tokens_per_step)
    return plan


def _choose_depth(config, unique_tokens: int, ranks, device, started: float, budget: float,
                  plan: dict) -> tuple[int, bool, str]:
    """(depth, dense, why): the data's bound where it is below the device default (dense when the model type
    is left to the run: an MoE's extra parameters memorise a small corpus; docs/LOG.md, #20), else the
    compute's choice (every rank takes rank 0's figures)."""
    auto_type = "model_type" in config.auto_fields
    most = MAX_EPOCHS * unique_tokens / MIN_TOKENS_PER_PARAM  # no size with more parameters can be chosen
    dense_family = candidates(config.replace(model_type="standard") if auto_type else config, range(1, MAX_DEPTH + 1),
                              past=lambda c: c.params > most)
    allowed = data_limited_depth(dense_family, unique_tokens)
    if allowed <= config.model.n_layers:
        return allowed, auto_type, (f"{unique_tokens:,} unique tokens: at most {MAX_EPOCHS:g} passes and about "
                                    f"{MIN_TOKENS_PER_PARAM:g} training token per parameter (training/sizing.py)")
    mine = [measure_flops(config, device) * ranks.world_size, TRAINING_SHARE * (budget - (time.time() - started))]
    flops, seconds = ranks.all_reduce_sum([v if ranks.is_main else 0.0 for v in mine])
    family = candidates(config, range(1, MAX_DEPTH + 1),
                        past=lambda c: c.flops_per_token * tokens_for(c.params, unique_tokens) > flops * seconds)
    choice = choose_size(family, flops * seconds, unique_tokens)
    plan.update(flops_per_s=flops, compute_seconds=seconds)
    return choice.depth, False, f"{choice.regime}: {choice.why}; {flops:.3g} FLOP/s measured"


def _resize(config, depth: int, dense: bool) -> None:
    """Give the config the family's shape of `depth` (and the dense model type when `dense`)."""
    if dense and config.model.model_type != "standard":
        config.derive(model_type="standard")
    if depth != config.model.n_layers or shape_for_depth(depth)["d_model"] != config.model.d_model or dense:
        config.derive(**shape_for_depth(depth), d_ff=_d_ff(config, depth))


def measure_flops(config, device) -> float:
    """Training FLOP/s of the config's model on `device`: forward and backward of a micro-batch of at most
    FLOPS_PROBE_BATCH sequences (eager), the best of two after a warm-up. The random state is left as it was."""
    from ..models import create_model
    from .precision import choose_precision

    precision = choose_precision(config, config.capabilities())
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        model = create_model(config).to(device)
        batch = min(config.training.batch_size, FLOPS_PROBE_BATCH)
        x = torch.randint(0, config.model.vocab_size, (batch, config.model.max_seq_len), device=device)
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            with precision.autocast():
                loss = model(x, x).loss
            loss.backward()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t0)
        flops = model.flops_per_token(config.model.max_seq_len) * x.numel() / min(times[1:])
    del model
    return flops


def _non_embedding_params(config) -> int:
    from ..models import create_model

    with torch.device("meta"):
        rep = create_model(config).parameter_report()
    return rep["total"] - rep["embedding"]
