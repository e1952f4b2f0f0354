"""`--time-budget`: the whole command — data, tokenizer, compilation, training, evaluations, task scoring —
ends within a wall budget.

Without --max-steps the budget plans the run's length: training.size_plan chooses the size (when left to
the run) and a provisional length before the model is built; the first PROBE_STEPS + 1 steps of the run are
the probe (compiled when the run compiles; the first step, which compiles, is not timed). `StepPlanner.
settle` then measures what the rest costs — a validation batch, the samples, the task scoring, a checkpoint
— and sets the number of steps that fit what is left, never more than the data allows. The schedule's decay
follows that length exactly (the warm-up was fixed before the probe and is at least as long). The plan is
written to config.json and a checkpoint at once: a resumed run keeps it (a run stopped during its probe
continues the probe). The probe's few steps misjudge the pace either way on a busy machine, so each periodic
evaluation before the run's last fifth refits the length (`refit`, `revise`) to the steps, evaluations and
checkpoints timed since, saved with that step's checkpoint. With --max-steps the budget is a limit only.
Either way `out_of_time` guards the end: the loop stops early (every rank together, and says so) if steps or
scoring were slower than measured.
"""

from __future__ import annotations

import itertools
import os
import statistics
import time

import torch

from ..configs.fields import parse_duration
from ..logs import get_logger
from .size_plan import PROBE_STEPS

log = get_logger(__name__).info

_IMPORTED = time.time()
_COMMAND_CLOCK: dict = {}


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


def start_command_clock() -> None:
    """Called by the command-line entry point: its run's budget counts from the process's start."""
    _COMMAND_CLOCK["start"] = command_started()


def run_started() -> float:
    """When this run's budget began: the command's start for the command's first run, else now (a run
    started from Python)."""
    return _COMMAND_CLOCK.pop("start", None) or time.time()


def budget_seconds(config) -> float | None:
    return parse_duration(config.training.time_budget) if config.training.time_budget else None


def planning(config) -> bool:
    """Whether the budget plans this run's length and has not settled it yet."""
    return (budget_seconds(config) is not None and "max_steps" in config.auto_fields
            and "max_steps" not in config.derived_fields)


class StepPlanner:
    """Settles the length after the probe steps (or, with a given length, only measures the costs) and
    guards the budget afterwards. `plan`: the record so far (size_plan.plan_size's, or the budget alone)."""

    def __init__(self, config, plan: dict, started: float):
        self.config, self.plan, self.started = config, plan, started
        self.budget = plan["time_budget_s"]
        self.fixed_length = plan.get("fixed_length", False)
        self.step_times: list[float] = []
        self.first_step: int | None = None  # this process's first step (it compiles: not timed)
        self.steps_seen = 0
        self.final_cost = 0.0
        self.settled = False
        self.eval_times: list[float] = []  # periodic evaluations after the plan, for its revisions
        self.save_times: list[float] = []
        self.periodic_cost = 0.0  # after a revision (which keeps no slack): one periodic evaluation and save

    def elapsed(self) -> float:
        return time.time() - self.started

    def observe(self, step: int, step_time: float) -> bool:
        """Record a step's time; True when the probe is over and the plan should be settled."""
        self.steps_seen = step
        if self.first_step is None:
            self.first_step = step
        else:
            self.step_times.append(step_time)
        return not self.settled and len(self.step_times) >= PROBE_STEPS

    def settle(self, costs: dict, steps: int | None = None) -> int:
        """`costs`: seconds of one evaluation ("eval"), of the final extras ("final": tasks, test split) and of
        one checkpoint ("save"). Sets max_steps (and what else the length decides and was left to the run);
        `steps` imposes the length (rank 0's, on the other ranks). Returns the length."""
        step = statistics.median(self.step_times)
        done, left = self.steps_seen, self.budget - self.elapsed()
        # the last step's evaluation, scoring and saves, and one periodic evaluation's slack
        self.final_cost = 2 * costs["eval"] + costs["final"] + 2 * costs["save"]
        self.settled = True
        if self.fixed_length:
            self.plan.update(step_time_s=step, costs=costs, planned_wall_s=self.elapsed() + self._reserve(
                self.config.training.max_steps, costs) + (self.config.training.max_steps - done) * step)
            return self.config.training.max_steps
        fitted = done
        for _ in range(4):  # the intervals depend on the length: a few rounds of the fixed point
            fitted = done + max(0, int((left - self._reserve(fitted, costs)) / step))
        if steps is None:
            steps = max(done, min(fitted, self.plan["data_steps"]))
        self._derive_length(steps)
        limited = "data" if steps == self.plan["data_steps"] else "time"
        self.plan.update(step_time_s=step, probe_steps=done, max_steps=steps, limited_by=limited, costs=costs,
                         planned_wall_s=self.elapsed() + (steps - done) * step + self._reserve(steps, costs),
                         epochs=steps * self.plan["tokens_per_step"] / max(1, self.plan["unique_tokens"]))
        log(f"Plan: {steps:,} steps ({limited}-limited; {self.plan['epochs']:.2f} passes over the data), "
                 f"{step:.3f} s per step measured, {self.plan['planned_wall_s']:.0f} s of the "
                 f"{self.budget:.0f} s budget planned")
        return steps

    def _derive_length(self, steps: int) -> None:
        from ..configs.adaptive_moe_config import periodic_defaults

        derived = {"max_steps": steps}
        for name, value in periodic_defaults(steps).items():
            if name in self.config.auto_fields:
                derived[name] = value
        warmup = self.config.optim.warmup_steps
        if "warmup_steps" in self.config.auto_fields and warmup > max(PROBE_STEPS + 1, steps // 20):
            # a run much shorter than the data allows: its warm-up shortens too (the probe's learning rates
            # were the longer warm-up's: the one inexact corner of the plan)
            derived["warmup_steps"] = max(PROBE_STEPS + 1, steps // 20)
        self.config.derive(**derived)

    def _reserve(self, steps: int, costs: dict) -> float:
        """Seconds of the evaluations, the final scoring and the checkpoints of a run of `steps` steps."""
        from ..configs.adaptive_moe_config import periodic_defaults

        every = {name: (value if name in self.config.auto_fields else getattr(self.config, name))
                 for name, value in periodic_defaults(steps).items()}
        evals = max(1, steps // every["eval_every"])
        saves = 1 + evals + max(1, steps // every["checkpoint_every"])  # the plan's own checkpoint first
        return evals * costs["eval"] + costs["final"] + saves * costs["save"]

    def record(self, kind: str, seconds: float) -> None:
        """After the plan: one periodic evaluation's ("eval") or checkpoint's ("save") measured seconds."""
        if self.settled:
            (self.eval_times if kind == "eval" else self.save_times).append(seconds)

    def revisable(self, step: int) -> bool:
        """Whether a periodic evaluation at `step` may refit the length (a planned one, before its last fifth)."""
        return self.settled and not self.fixed_length and step < REVISE_UNTIL * self.config.training.max_steps

    def refit(self, step: int) -> int:
        """The length that fits what is left of the budget, by the step, evaluation and checkpoint times
        measured since the plan (the probe's few steps and one-off measurements drift either way); the
        current length when the change would be under REVISE_MIN."""
        costs = self._measured_costs()
        pace = statistics.median(self.step_times[-REVISE_WINDOW:])
        left = REVISE_AIM * self.budget - self.elapsed()

        def fits(steps: int) -> int:  # the length the time left allows if the run were `steps` long
            return step + 1 + max(0, int((left - self._reserve_after(step, steps, costs)) / pace))

        fitted = fits(fits(self.config.training.max_steps))
        while fitted > step + 1 and fits(fitted) < fitted:  # an evaluation more than it has time for
            fitted = min(fitted - 1, fits(fitted))
        fitted = min(fitted, self.plan["data_steps"])
        current = self.config.training.max_steps
        return current if abs(fitted - current) < max(2, REVISE_MIN * current) else fitted

    def _reserve_after(self, step: int, steps: int, costs: dict) -> float:
        """Seconds of what a run of `steps` steps still does besides training after `step`: this step's
        checkpoint (a revision saves it), the periodic evaluations and checkpoints, and the end."""
        config = self.config
        evals = (steps - 1) // config.training.eval_every - step // config.training.eval_every
        saves = 1 + evals + (steps - 1) // config.training.checkpoint_every - step // config.training.checkpoint_every
        return _end_cost(costs) + evals * costs["eval"] + saves * costs["save"]

    def _measured_costs(self) -> dict:
        """The plan's costs, with the evaluations' and checkpoints' seconds measured since where there are some."""
        costs = dict(self.plan["costs"])
        for name, times in (("eval", self.eval_times), ("save", self.save_times)):
            costs[name] = statistics.mean(times) if times else costs[name]
        return costs

    def revise(self, step: int, steps: int) -> None:
        """Apply a refitted length (rank 0's, on every rank) and record it in the plan."""
        previous = self.config.training.max_steps
        self.config.derive(max_steps=steps)
        costs = self._measured_costs()
        self.final_cost, self.periodic_cost = _end_cost(costs), costs["eval"] + costs["save"]
        self.plan.setdefault("revisions", []).append({"at_step": step, "from": previous, "to": steps,
                                                      "step_time_s": statistics.median(self.step_times[-REVISE_WINDOW:])})
        self.plan.update(max_steps=steps, epochs=steps * self.plan["tokens_per_step"] / max(1, self.plan["unique_tokens"]),
                         limited_by="data" if steps == self.plan["data_steps"] else "time",
                         planned_wall_s=self.elapsed() + (steps - step) * self.plan["revisions"][-1]["step_time_s"]
                         + self._reserve_after(step, steps, costs))
        log(f"Plan revised at step {step}: {previous:,} -> {steps:,} steps, by the times measured since the plan")

    def out_of_time(self) -> bool:
        """After the plan: whether one more step would leave too little for the final scoring."""
        if not self.settled:
            return False
        step = statistics.median(self.step_times[-PROBE_STEPS:])
        following = self.steps_seen + 1
        if following % self.config.training.eval_every == 0 and following < self.config.training.max_steps:
            step += self.periodic_cost  # a periodic evaluation due next
        return self.elapsed() + step + self.final_cost > self.budget


def _end_cost(costs: dict) -> float:
    """Seconds after the last step, by measured costs: its evaluation, the final extras, two saves."""
    return costs["eval"] + costs["final"] + 2 * costs["save"]


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
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t0)
            tokens = batch[0].numel()
    core.train(was_training)
    per_batch = statistics.median(times[1:] or times) if times else 0.0
    t0 = time.perf_counter()
    run.write_samples(0, write=False)
    samples = time.perf_counter() - t0
    batches = len(run.val_loader) if hasattr(run.val_loader, "__len__") else config.training.eval_batches
    tasks = run.task_scorer.estimate_seconds(core) if hasattr(run.task_scorer, "estimate_seconds") else 0.0
    test = per_batch / max(1, tokens) * run.planner.plan.get("test_tokens", 0)
    weights = sum(p.numel() * p.element_size() for p in core.parameters())
    save = 0.2 + 3 * weights / SAVE_BYTES_PER_S  # weights and the optimizer's states (about twice the weights)
    periodic_tasks = tasks if config.training.eval_tasks_periodic else 0.0
    return {"eval": batches * per_batch + samples + periodic_tasks, "final": tasks - periodic_tasks + test,
            "save": save}


# Revisions: at the periodic evaluations before the last fifth of the run, by the median of the last
# REVISE_WINDOW steps, when the length would move by at least REVISE_MIN of itself; they aim at REVISE_AIM of
# the budget (the rest: the spread of the steps still to come).
REVISE_UNTIL, REVISE_WINDOW, REVISE_MIN, REVISE_AIM = 0.8, 100, 0.02, 0.99

# A conservative write speed of a checkpoint to local disk, for the plan's estimate of a save.
SAVE_BYTES_PER_S = 200e6
