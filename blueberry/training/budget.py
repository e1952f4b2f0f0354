"""`--time-budget`: the whole command — data, tokenizer, compilation, training, evaluations, task scoring —
ends within a wall budget.

Before the model is built, `plan_size` lets the data bound the model (training.sizing) and sets a provisional
length: the steps of the tokens the rule allows. The first `PROBE_STEPS` steps of the run are the probe
(compiled when the run compiles; the first step, which compiles, is not timed). `StepPlanner.settle` then
times a validation batch and the sample generation, and sets the number of steps that fit what is left of
the budget after the evaluations and the final scoring — never more than the data allows. The schedule's
decay is set for exactly that length (the warm-up was fixed before the probe and is at least as long,
so the steps already taken had the learning rates of the final plan). The plan is written to config.json
and a checkpoint at once: a resumed run keeps it. Past the plan, `out_of_time` is a guard: the loop ends
early (and says so) if the step or the scoring was slower than measured.
"""

from __future__ import annotations

import itertools
import os
import statistics
import time

import torch

from ..configs.fields import parse_duration
from .sizing import (MAX_DEPTH, MAX_EPOCHS, MIN_TOKENS_PER_PARAM, Candidate, choose_size,
                     data_limited_depth, shape_for_depth, tokens_for)

PROBE_STEPS = 8  # training steps timed before the length is settled (after the first)
_IMPORTED = time.time()


def command_started() -> float:
    """The wall-clock time this process started (Linux: from /proc; elsewhere: when this module loaded)."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime"))
        return boot + start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return _IMPORTED


_COMMAND_CLOCK: dict = {}


def start_command_clock() -> None:
    """Called by the train command: its first run's budget counts from the process's start."""
    _COMMAND_CLOCK["start"] = command_started()


def run_started() -> float:
    """When this run's budget began: the command's start for the command's first run, else now (a later run
    of an LR sweep, whose runs share the command's budget, or a run started from Python)."""
    return _COMMAND_CLOCK.pop("start", None) or time.time()


def budget_seconds(config) -> float | None:
    """The budget in seconds when this run plans its length by it (none when --max-steps was given)."""
    if not config.time_budget or "max_steps" not in config.auto_fields:
        return None
    return parse_duration(config.time_budget)


def planning(config) -> bool:
    """Whether the run still has to settle its length (a resumed run keeps the plan it made)."""
    return budget_seconds(config) is not None and "max_steps" not in config.derived_fields


def size_is_auto(config) -> bool:
    return config.layers is None and all(f in config.auto_fields for f in ("d_model", "n_layers", "n_heads"))


def candidates(config, depths) -> list[Candidate]:
    """The family's sizes, built on the meta device (nothing allocated)."""
    from ..models import create_model

    out = []
    for depth in depths:
        shaped = config.replace(**shape_for_depth(depth), d_ff=_d_ff(config, depth))
        with torch.device("meta"):
            model = create_model(shaped)
        rep = model.parameter_report()
        out.append(Candidate(depth, rep["total"] - rep["embedding"], model.flops_per_token(config.max_seq_len)))
    return out


def _d_ff(config, depth: int) -> int:
    from ..configs.adaptive_moe_config import default_d_ff

    if "d_ff" not in config.auto_fields:
        return config.d_ff
    return default_d_ff(shape_for_depth(depth)["d_model"], config)


def plan_size(config, unique_tokens: int, ctx, device, started: float, log) -> dict:
    """Before the model is built: choose its size when it is left to the run, and set the provisional length
    and warm-up from the tokens the rule allows. Returns the plan's record so far.

    Where the data bounds the model below the device's default size, the data decides (training.sizing).
    Where the corpus allows more, the compute decides: the device default's forward and backward are timed
    (eager; rank 0's figure on every rank) and the rule picks the largest size the budget trains on its tokens."""
    plan = {"time_budget_s": budget_seconds(config), "unique_tokens": unique_tokens}
    if size_is_auto(config):
        depth, dense, why = _choose_depth(config, unique_tokens, ctx, device, started, plan)
        _resize(config, depth, dense)
        plan["size_rule"] = why
        log(f"Plan: depth {depth} (d_model {config.d_model}, {config.model_type}): {why}")
    tokens_per_step = config.tokens_per_step * ctx.world_size
    params = _non_embedding_params(config)
    data_steps = max(PROBE_STEPS + 1, tokens_for(params, unique_tokens) // tokens_per_step)
    # provisional, as an automatic default is: `StepPlanner.settle` derives the final length
    config.max_steps = data_steps
    if "warmup_steps" in config.auto_fields:
        config.derive(warmup_steps=max(PROBE_STEPS + 1, min(100, data_steps // 20)))
    plan.update(params=params, data_steps=data_steps, tokens_per_step=tokens_per_step)
    return plan


# The share of the budget left at planning time that the size choice gives to training steps (the rest: the
# evaluations, the final scoring, compilation); the probe then plans the steps from measured figures.
TRAINING_SHARE = 0.85


def _choose_depth(config, unique_tokens: int, ctx, device, started: float, plan: dict) -> tuple[int, bool, str]:
    """(depth, dense, why): the data's bound where it is below the device default (dense when the model type
    is left to the run: an MoE's extra parameters memorise a small corpus; docs/LOG.md, #20), else the
    compute's choice."""
    auto_type = "model_type" in config.auto_fields
    dense_family = candidates(config.replace(model_type="standard") if auto_type else config, range(1, MAX_DEPTH + 1))
    allowed = data_limited_depth(dense_family, unique_tokens)
    if allowed <= config.n_layers:
        return allowed, auto_type, (f"{unique_tokens:,} unique tokens: at most {MAX_EPOCHS:g} passes and about "
                                    f"{MIN_TOKENS_PER_PARAM:g} training token per parameter (training/sizing.py)")
    flops = ctx.all_reduce_sum([measure_flops(config, device) if ctx.is_main else 0.0])[0]
    seconds = TRAINING_SHARE * (budget_seconds(config) - (time.time() - started))
    choice = choose_size(candidates(config, range(1, MAX_DEPTH + 1)), flops * seconds, unique_tokens)
    plan["flops_per_s"] = flops
    return choice.depth, False, f"{choice.regime}: {choice.why}; {flops:.3g} FLOP/s measured"


def _resize(config, depth: int, dense: bool) -> None:
    """Give the config the family's shape of `depth` (and the dense model type when `dense`)."""
    if dense and config.model_type != "standard":
        config.derive(model_type="standard")
    if depth != config.n_layers or shape_for_depth(depth)["d_model"] != config.d_model or dense:
        config.derive(**shape_for_depth(depth), d_ff=_d_ff(config, depth))


def measure_flops(config, device) -> float:
    """Training FLOP/s of the config's model on `device`: forward and backward of one micro-batch (eager),
    the best of two after a warm-up. The global random state is left as it was."""
    from ..models import create_model
    from .precision import choose_precision

    precision = choose_precision(config, config.capabilities())
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        model = create_model(config).to(device)
        x = torch.randint(0, config.vocab_size, (config.batch_size, config.max_seq_len), device=device)
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            with precision.autocast():
                loss = model(x, x).loss
            loss.backward()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t0)
        flops = model.flops_per_token(config.max_seq_len) * x.numel() / min(times[1:])
    del model
    return flops


def _non_embedding_params(config) -> int:
    from ..models import create_model

    with torch.device("meta"):
        rep = create_model(config).parameter_report()
    return rep["total"] - rep["embedding"]


class StepPlanner:
    """Settles the length after the probe steps and guards the budget afterwards."""

    def __init__(self, config, plan: dict, started: float, log):
        self.config, self.plan, self.started, self.log = config, plan, started, log
        self.budget = plan["time_budget_s"]
        self.step_times: list[float] = []
        self.steps_seen = 0
        self.final_cost = 0.0
        self.settled = False

    def elapsed(self) -> float:
        return time.time() - self.started

    def observe(self, step: int, step_time: float) -> bool:
        """Record a step's time; True when the probe is over and the plan should be settled."""
        self.steps_seen = step
        if step > 1:  # the first step compiles
            self.step_times.append(step_time)
        return not self.settled and len(self.step_times) >= PROBE_STEPS

    def settle(self, costs: dict, steps: int | None = None) -> int:
        """`costs`: seconds of one evaluation ("eval"), of the final extras ("final": tasks, test split) and of
        one checkpoint ("save"). Sets max_steps (and the periodic intervals left to the run) and returns it;
        `steps` imposes the length (rank 0's, on the other ranks)."""
        from ..configs.adaptive_moe_config import periodic_defaults

        step = statistics.median(self.step_times)
        steps_done = self.steps_seen
        left = self.budget - self.elapsed()
        fitted = steps_done
        for _ in range(4):  # the intervals depend on the length: a few rounds of the fixed point
            fitted = steps_done + max(0, int((left - self._reserve(fitted, costs)) / step))
        if steps is None:
            steps = max(steps_done, min(fitted, self.plan["data_steps"]))
        derived = {"max_steps": steps}
        for name, value in periodic_defaults(steps).items():
            if name in self.config.auto_fields:
                derived[name] = value
        self.config.derive(**derived)
        # the last step's evaluation, scoring and saves, and one periodic evaluation's slack
        self.final_cost = 2 * costs["eval"] + costs["final"] + 2 * costs["save"]
        self.settled = True
        limited = "data" if steps == self.plan["data_steps"] else "time"
        self.plan.update(step_time_s=step, probe_steps=steps_done, max_steps=steps, limited_by=limited,
                         planned_wall_s=self.elapsed() + (steps - steps_done) * step + self._reserve(steps, costs),
                         costs=costs,
                         epochs=steps * self.plan["tokens_per_step"] / max(1, self.plan["unique_tokens"]))
        self.log(f"Plan: {steps:,} steps ({limited}-limited; {self.plan['epochs']:.2f} passes over the data), "
                 f"{step:.3f} s per step measured, {self.plan['planned_wall_s']:.0f} s of the "
                 f"{self.budget:.0f} s budget planned")
        return steps

    def _reserve(self, steps: int, costs: dict) -> float:
        """Seconds of the evaluations, the final scoring and the checkpoints of a run of `steps` steps."""
        from ..configs.adaptive_moe_config import periodic_defaults

        every = {name: (value if name in self.config.auto_fields else getattr(self.config, name))
                 for name, value in periodic_defaults(steps).items()}
        evals = max(1, steps // every["eval_every"])
        saves = evals + max(1, steps // every["checkpoint_every"])
        return evals * costs["eval"] + costs["final"] + saves * costs["save"]

    def out_of_time(self) -> bool:
        """After the plan: whether one more step would leave too little for the final scoring."""
        if not self.settled:
            return False
        step = statistics.median(self.step_times[-PROBE_STEPS:])
        return self.elapsed() + step + self.final_cost > self.budget


def measure_costs(run) -> dict:
    """Seconds of one evaluation (its validation batches and the samples), of the final extras (task scoring,
    the test split) and of one checkpoint, measured on the run's model (`run`: the trainer's `_Run`)."""
    config, core = run.config, run.core
    device = next(core.parameters()).device
    times, tokens = [], 0
    was_training = core.training
    core.eval()
    with torch.no_grad(), run.precision.autocast():
        for batch in itertools.islice(iter(run.val_loader), 3):
            t0 = time.perf_counter()
            core(batch[0].to(device))
            times.append(time.perf_counter() - t0)
            tokens = batch[0].numel()
    core.train(was_training)
    per_batch = statistics.median(times[1:] or times) if times else 0.0
    per_token = per_batch / max(1, tokens)
    t0 = time.perf_counter()
    run.write_samples(0, write=False)
    samples = time.perf_counter() - t0
    batches = len(run.val_loader) if hasattr(run.val_loader, "__len__") else config.eval_batches
    tasks = run.task_scorer.estimate_seconds(core) if hasattr(run.task_scorer, "estimate_seconds") else 0.0
    final = tasks + per_token * run.planner.plan.get("test_tokens", 0)
    weights = sum(p.numel() * p.element_size() for p in core.parameters())
    save = 0.2 + 3 * weights / SAVE_BYTES_PER_S  # weights and the optimizer's states (about twice the weights)
    return {"eval": batches * per_batch + samples, "final": final, "save": save}


# A conservative write speed of a checkpoint to local disk, for the plan's estimate of a save.
SAVE_BYTES_PER_S = 200e6
