"""`train_model`: the training loop, top to bottom.

Per optimizer step (`train_step`): `grad_accum_steps` micro-batches (forward under autocast, backward,
DDP sync on the last only) -> one all-reduce of the step's loss and of any stop request -> unscale +
clip -> the optimizer step, or a skipped step when the loss or gradient is not finite -> one LR-schedule
step. An fp16 loss-scaler overflow is not a failure: the scaler lowers its scale and the step is taken
again on the next batch (the schedule does not advance). Every step is logged; every `eval_every` steps
the model is evaluated, samples written and plots redrawn; every `checkpoint_every` steps (and at the
end, and when any rank receives SIGINT/SIGTERM) a checkpoint is written atomically: one file set by rank 0
(runs/checkpoint.py), or under FSDP2 each rank's shards (sharded_checkpoint.py, optionally in the background).
"""

from __future__ import annotations

import contextlib
import copy
import math
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import CheckpointError, ConfigError, RunError
from ..logs import get_logger
from ..models.adaptive_llm import MOE_STATS
from ..models.generation import generate_text
from ..optimizers import get_lr_scheduler, setup_optimizers
from ..runs.checkpoint import check_optimizer_layout, is_sharded_checkpoint, save_checkpoint
from ..runs.layout import samples_path, write_config, write_summary
from .budget import measure_costs
from .distributed import DistContext, is_sharded, keyed_by_index, load_full_optimizer_states, no_sync, scalar, unwrap
from .evaluation import evaluate_model
from .expert_parallel import expert_parallel_of
from .metrics import MetricsLogger
from .plots import plot_run
from .precision import Precision, choose_precision
from .trackers import parse_trackers

log = get_logger(__name__).info

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequest:
    """SIGINT/SIGTERM set a flag (which signal: `signum`); the loop agrees on it across ranks, finishes
    the step, saves and exits with 128 + signum. A second signal stops at once."""

    def __init__(self):
        self.signum: int | None = None
        self._previous = {}

    def __enter__(self):
        for sig in STOP_SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:  # second signal: stop now
            raise KeyboardInterrupt
        self.signum = signum

    def flags(self) -> list[float]:
        """One slot per stop signal, summed over ranks so that every rank learns of any rank's signal."""
        return [1.0 if self.signum == sig else 0.0 for sig in STOP_SIGNALS]

    @staticmethod
    def agreed(summed_flags: list[float]) -> int | None:
        for sig, count in zip(STOP_SIGNALS, summed_flags):
            if count > 0:
                return int(sig)
        return None

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@dataclass
class LoopState:
    """What the loop counts, saved in every checkpoint."""
    step: int = 0
    best_val: float = math.inf
    skipped: int = 0  # non-finite steps
    overflows: int = 0  # fp16 loss-scale overflows (normal: the scaler adjusts)
    consecutive_bad: int = 0
    stop_signal: int | None = None
    out_of_time: bool = False  # the time budget's guard ended the run before its planned length
    last_eval: dict = field(default_factory=dict)
    elapsed_before: float = 0.0  # wall seconds of the run before this process (resumed runs)
    started: float = field(default_factory=time.perf_counter)

    @property
    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.started


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():  # a resume on fewer GPUs restores the ones it has
        for index, cuda_state in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, index)


def train_step(model, train_loader, optimizers, params, precision: Precision, config, ctx: DistContext,
               stop: StopRequest) -> dict:
    """One optimizer step's micro-batches, backward passes and update. Returns the step's record and
    `outcome`: "stepped", "overflow" (fp16 scale too high: nothing applied) or "nonfinite" (skipped)."""
    device = next(model.parameters()).device
    losses, lm_losses, moe_stats, data_time = [], [], None, 0.0
    for micro in range(config.training.grad_accum_steps):
        t0 = time.perf_counter()
        batch = train_loader.next_batch()
        x, y = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
        doc_ids = batch[2].to(device) if len(batch) > 2 else None
        data_time += time.perf_counter() - t0
        last = micro == config.training.grad_accum_steps - 1
        with no_sync(model, active=ctx.enabled and not last):
            with precision.autocast():
                out = model(x, y, doc_ids=doc_ids)
            loss = out.loss / config.training.grad_accum_steps
            if precision.scaler is not None:
                precision.scaler.scale(loss).backward()
            else:
                loss.backward()
        # the figures stay on the device: no host sync between micro-steps
        losses.append(loss.detach().float().reshape(1))
        lm_losses.append(out.lm_loss.detach().float().reshape(1) / config.training.grad_accum_steps)
        if last and out.moe_stats is not None:
            moe_stats = out.moe_stats.detach().float()
    # one host sync per step for the losses (and the MoE figures of the last micro-batch)
    numbers = [torch.cat(losses).sum().reshape(1), torch.cat(lm_losses).sum().reshape(1)]
    numbers = torch.cat(numbers + ([moe_stats] if moe_stats is not None else [])).tolist()
    loss_sum, lm_sum = numbers[0], numbers[1]
    moe_stats = dict(zip(MOE_STATS, numbers[2:]))
    # one collective: the global mean losses (one rank's NaN makes every rank skip together) and any
    # rank's stop request (every rank stops after this same step)
    summed = ctx.all_reduce_sum([loss_sum, lm_sum, *stop.flags()])
    loss_sum, lm_sum = summed[0] / ctx.world_size, summed[1] / ctx.world_size
    stop_signal = StopRequest.agreed(summed[2:])
    t_opt = time.perf_counter()
    if precision.scaler is not None:
        for opt in optimizers:
            precision.scaler.unscale_(opt)
    max_norm = config.optim.grad_clip if config.optim.grad_clip > 0 else math.inf
    experts = expert_parallel_of(unwrap(model))
    grad_norm = scalar(experts.sync_and_clip(params, max_norm) if experts is not None
                       else torch.nn.utils.clip_grad_norm_(params, max_norm))
    if not math.isfinite(loss_sum):
        outcome = "nonfinite"
    elif math.isfinite(grad_norm):
        outcome = "stepped"
    else:  # finite loss, infinite gradient: with a loss scaler that is an overflow of the scale
        outcome = "overflow" if precision.scaler is not None else "nonfinite"
    if precision.scaler is not None:
        for opt in optimizers:
            precision.scaler.step(opt)  # skips the update itself when the gradients hold inf/NaN
        precision.scaler.update()
    elif outcome == "stepped":
        for opt in optimizers:
            opt.step()
    lr = optimizers[0].param_groups[0]["lr"]
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # the optimizer's kernels have run: its time is its own
    record = {"loss": loss_sum, "lm_loss": lm_sum, "lr": lr, "grad_norm": grad_norm, "data_time": data_time,
              "optimizer_time": time.perf_counter() - t_opt}
    record.update(moe_stats)
    for source, tokens in (getattr(train_loader, "tokens_by_source", None) or {}).items():
        record[f"tokens/{source}"] = tokens  # a mixture: tokens served per source (this rank)
    return {"record": record, "outcome": outcome, "stop_signal": stop_signal}


def _write_samples(model, tokenizer, corpus_prompts, run_dir: Path, step: int, config, write: bool) -> list[str]:
    texts = []
    for i, prompt in enumerate(corpus_prompts):
        cont = generate_text(unwrap(model), tokenizer, prompt, max_new_tokens=config.training.sample_tokens,
                             temperature=0.8, top_k=50, seed=config.training.seed + i, eos=tokenizer.eot_id)
        texts.append(prompt + cont)
    if not write:
        return texts
    with open(samples_path(run_dir), "a", encoding="utf-8") as f:
        f.write(f"===== step {step} =====\n")
        for t in texts:
            f.write(t.strip() + "\n-----\n")
    return texts


class _Run:
    """What the loop's periodic actions share: checkpointing, evaluation and resuming."""

    def __init__(self, model, optimizers, scheduler, precision, train_loader, val_loader, config, ctx,
                 run_dir, tokenizer, token_bytes, sample_prompts, logger, peak, task_scorer=None, planner=None):
        self.model, self.core = model, unwrap(model)
        self.optimizers, self.scheduler, self.precision = optimizers, scheduler, precision
        self.train_loader, self.val_loader = train_loader, val_loader
        self.config, self.ctx, self.run_dir = config, ctx, run_dir
        self.tokenizer, self.token_bytes, self.sample_prompts = tokenizer, token_bytes, sample_prompts
        self.logger, self.peak = logger, peak
        self.sharded = is_sharded(model)
        self.task_scorer = task_scorer
        self.planner = planner  # a time budget's StepPlanner (training.budget), or None
        self.experts = expert_parallel_of(self.core)  # expert parallelism's handle, or None
        self.plan_unsaved = False
        self.saver = None
        if self.sharded:
            from .sharded_checkpoint import ShardedCheckpointer

            self.saver = ShardedCheckpointer(run_dir, ctx, asynchronous=bool(config.training.async_checkpoint))

    def full_model(self):
        """For evaluations, samples, the plan's measurements and single-file checkpoints: under DDP, expert
        parallelism gathers every expert onto every rank for the duration (a collective), since the ranks may run
        different numbers of forwards. Under FSDP2 they cannot (each forward is a collective already), so the
        experts stay where they are and tokens travel to them."""
        if self.experts is None or self.sharded:
            return contextlib.nullcontext()
        return self.experts.full_experts()

    def write_samples(self, step: int, write: bool) -> None:
        """Sample from the model's prompts (every rank when sharded: its forwards need them all)."""
        if self.tokenizer is not None and (self.ctx.is_main or self.sharded):
            _write_samples(self.model, self.tokenizer, self.sample_prompts, self.run_dir, step, self.config, write)

    def settle_plan(self, loop: LoopState, bar) -> None:
        """The probe is over: measure what the rest of the run costs, settle the length on rank 0's figures
        (every rank the same), record the plan in config.json and a checkpoint."""
        with self.full_model():
            mine = measure_costs(self)
        costs = dict(zip(mine, self.ctx.all_reduce_sum([v if self.ctx.is_main else 0.0 for v in mine.values()])))
        steps = self.planner.settle(costs)
        agreed = int(self.ctx.all_reduce_sum([float(steps) if self.ctx.is_main else 0.0])[0])
        if agreed != steps:  # another rank's clock: rank 0's length is everyone's
            self.planner.settle(costs, steps=agreed)
        self._follow_new_length(loop, bar)

    def _follow_new_length(self, loop: LoopState, bar) -> None:
        """The plan's length changed: the schedule, the progress bar and config.json follow, the plan is
        logged, and `_periodic` saves this step (once, whatever else is due at it)."""
        self.scheduler.set_max_steps(self.config.training.max_steps)
        if bar is not None:
            bar.total = self.config.training.max_steps
            bar.refresh()
        if self.ctx.is_main:
            write_config(self.run_dir, self.config)
            self.logger.log("plan", loop.step, self.planner.plan)
        self.plan_unsaved = True

    def revise_plan(self, loop: LoopState, bar) -> None:
        """At a periodic evaluation of a planned run: refit the length to the times measured since the plan
        (rank 0's figures, every rank the same); a changed plan is saved with this step."""
        if self.planner is None or not self.planner.revisable(loop.step):
            return
        mine = self.planner.refit(loop.step) if self.ctx.is_main else 0
        steps = int(self.ctx.all_reduce_sum([float(mine)])[0])
        if steps == self.config.training.max_steps:
            return
        self.planner.revise(loop.step, steps)
        self._follow_new_length(loop, bar)

    def resume(self, state: dict, loop: LoopState, checkpoint=None) -> None:
        """Continue from `state` (read from `checkpoint`), at this run's world size whatever the writer's."""
        check_optimizer_layout(self.optimizers, state["optimizers"])
        self._load_optimizers(state["optimizers"], checkpoint)
        self.scheduler.load_state_dict(state["scheduler"])
        if self.precision.scaler is not None and state.get("scaler"):
            self.precision.scaler.load_state_dict(state["scaler"])
        self.train_loader.load_state_dict(state["data"])
        set_rng_state(state["rng"])
        loop.step, loop.best_val = state["step"], state.get("best_val", math.inf)
        loop.skipped, loop.overflows = state.get("skipped_steps", 0), state.get("overflow_steps", 0)
        loop.elapsed_before = state.get("elapsed", 0.0)
        log(f"Resumed at step {loop.step} (epoch {self.train_loader.epoch}, batch {self.train_loader.position})")

    def _load_optimizers(self, states: list[dict], checkpoint) -> None:
        """The optimizers' states, as this run lays its parameters out (sharded, expert-parallel or whole)."""
        if checkpoint is not None and is_sharded_checkpoint(checkpoint):  # DCP reads each rank's own part
            from ..runs.dcp_reader import load_sharded_optimizers

            load_sharded_optimizers(checkpoint, self.core, self.optimizers, states, self.experts)
            return
        by_index = all(keyed_by_index(sd) for sd in states)
        if self.experts is not None and not by_index:
            raise CheckpointError(f"{checkpoint} holds the gathered optimizer state of an FSDP2 run of an earlier "
                                  "version: resume it without --expert-parallel")
        if self.experts is not None:  # a whole (single-file) state: this rank's experts' part of it
            states = self.experts.slice_optimizer_states(self.optimizers, states)
        if self.sharded or not by_index:
            load_full_optimizer_states(self.core, self.optimizers, states)
        else:
            for opt, sd in zip(self.optimizers, states):
                opt.load_state_dict(sd)

    def checkpoint(self, loop: LoopState, is_best: bool = False):
        """Write this step's checkpoint (a time budget's plan counts the seconds it took). A sharded one holds
        each rank's own experts; a single-file one the whole model (expert parallelism gathers it)."""
        started = time.perf_counter()
        with self.full_model():
            written = self._write_checkpoint(loop, is_best)
        if self.planner is not None:
            self.planner.record("save", time.perf_counter() - started)
        return written

    def _write_checkpoint(self, loop: LoopState, is_best: bool):
        scaler = self.precision.scaler
        state = {"scheduler": self.scheduler.state_dict(),
                 "scaler": scaler.state_dict() if scaler else None, "data": self.train_loader.state_dict(),
                 "rng": rng_state(), "config": self.config.to_dict(),
                 "tokenizer": getattr(self.tokenizer, "identity", None), "best_val": loop.best_val,
                 "skipped_steps": loop.skipped, "overflow_steps": loop.overflows, "elapsed": loop.elapsed,
                 "world_size": self.ctx.world_size, "parallel": self.config.training.parallel,
                 "plan": copy.deepcopy(self.planner.plan) if self.planner is not None else None}
        if self.sharded:  # FSDP2: every rank writes its own shards, rank 0 commits
            return self.saver.save(loop.step, self.core, self.optimizers, state, self.config.training.keep_checkpoints,
                                   best=is_best)
        # expert parallelism: every rank's experts' states (a collective), then rank 0 writes the whole
        optimizer_states = (self.experts.full_optimizer_states(self.optimizers) if self.experts is not None
                            else None)
        if self.ctx.is_main:
            state["optimizers"] = optimizer_states or [o.state_dict() for o in self.optimizers]
            return save_checkpoint(self.run_dir, loop.step, self.core, state,
                                   keep=self.config.training.keep_checkpoints, best=is_best)
        return None

    def poll_saves(self, wait: bool = False) -> None:
        """Commit a background checkpoint write that has finished (with `wait`: once it has)."""
        if self.saver is not None:
            self.saver.wait() if wait else self.saver.poll()

    def evaluate(self, loop: LoopState) -> bool:
        """Score the validation set (every rank its share, totals summed); True when it is the best yet."""
        started = time.perf_counter()
        with self.full_model():
            return self._evaluate(loop, started)

    def _evaluate(self, loop: LoopState, started: float) -> bool:
        # forward-only passes run the plain model (a compiled one would recompile for eval mode);
        # under FSDP2 the plain model is the sharded one, so every rank still takes part
        result = evaluate_model(self.core, self.val_loader, self.config, token_bytes=self.token_bytes,
                                precision=self.precision, peak_flops=self.peak, ranks=self.ctx)
        final = loop.step == self.config.training.max_steps or loop.stop_signal is not None or loop.out_of_time
        if self.task_scorer is not None and (final or self.config.training.eval_tasks_periodic) and (
                self.ctx.is_main or self.sharded):  # sharded forwards need every rank
            with self.precision.autocast():
                result.update(self.task_scorer(self.core))
        is_best = result["loss"] < loop.best_val
        loop.best_val = min(loop.best_val, result["loss"])
        loop.last_eval = result
        self.write_samples(loop.step, write=self.ctx.is_main)
        if self.ctx.is_main:
            self.logger.log("eval", loop.step, result)
            plot_run(self.logger.records, self.run_dir)
        if self.planner is not None and not final:
            self.planner.record("eval", time.perf_counter() - started)
        return is_best


def train_model(model, train_loader, val_loader, config, *, run_dir=None, tokenizer=None, token_bytes=None,
                resume_state: dict | None = None, ctx: DistContext | None = None,
                sample_prompts: tuple[str, ...] = ("\n",), progress: bool = True, task_scorer=None, planner=None,
                resume_checkpoint=None):
    """Train `model` for `config.training.max_steps` optimizer steps; returns (model, metrics). `task_scorer(model)`
    (from blueberry.evaluation, given by the caller) adds task scores to the final evaluation, and to
    every evaluation with `eval_tasks_periodic`. `resume_checkpoint`: where `resume_state` was read (a sharded
    checkpoint holds the optimizer tensors there)."""
    ctx = ctx or DistContext()
    caps = config.capabilities()
    precision = _precision_for(model, config, caps)
    run_dir = _run_dir(config, run_dir)
    logger = MetricsLogger(run_dir, enabled=ctx.is_main, trackers=parse_trackers(config.training.tracker))
    logger.log_config(config.to_dict())
    core = unwrap(model)
    optimizers = setup_optimizers(core, config,
                                  distributed=ctx.enabled)
    scheduler = get_lr_scheduler(optimizers, config)
    params = [p for p in model.parameters() if p.requires_grad]
    flops_per_token = core.flops_per_token(config.model.max_seq_len)
    peak = caps.job_peak_flops(ctx.world_size, ctx.local_world_size)
    run = _Run(model, optimizers, scheduler, precision, train_loader, val_loader, config, ctx, run_dir,
               tokenizer, token_bytes, sample_prompts, logger, peak, task_scorer, planner)
    loop = LoopState()
    if resume_state is not None:
        run.resume(resume_state, loop, resume_checkpoint)

    log(f"Training {config.model.architecture} model: {core.parameter_report()['total']:,} params, "
        f"precision {precision.name}, fp8 {'on' if config.training.use_fp8 else 'off'}, {ctx.world_size} process(es), "
        f"{config.tokens_per_step * ctx.world_size:,} tokens per optimizer step")
    if config.training.init_from and resume_state is None:
        run.evaluate(loop)  # step 0: where the pretrained weights start, the "before" of a fine-tune
    bar = _progress_bar(config, loop.step) if progress and ctx.is_main else None
    tok_rate = None
    model.train()
    with StopRequest() as stop:
        while loop.step < config.training.max_steps:
            t0 = time.perf_counter()
            result = train_step(model, train_loader, optimizers, params, precision, config, ctx, stop)
            record, outcome = result["record"], result["outcome"]
            loop.stop_signal = result["stop_signal"]
            dt = time.perf_counter() - t0
            if outcome == "overflow":
                loop.overflows += 1
                logger.log("overflow", loop.step, {"loss_scale": precision.scaler.get_scale(), "step_time": dt})
                if loop.stop_signal is None:
                    continue  # the same step again with the lowered scale; the schedule waits
            else:
                _count_outcome(loop, outcome, record)
                scheduler.step()
                loop.step += 1
                tokens = config.tokens_per_step * ctx.world_size
                tok_rate = tokens / dt if tok_rate is None else 0.9 * tok_rate + 0.1 * tokens / dt
                record.update(tokens_per_sec=tokens / dt, mfu=flops_per_token * tokens / dt / peak, step_time=dt,
                              tokens=loop.step * tokens, elapsed=loop.elapsed,
                              optimizer_share=record["optimizer_time"] / dt)
                logger.log("train", loop.step, record)
                _follow_the_plan(run, loop, dt, bar)
                if bar is not None:
                    bar.set_postfix(loss=f"{record['lm_loss']:.3f}", lr=f"{record['lr']:.2e}",
                                    tok_s=f"{tok_rate:,.0f}", refresh=False)
                    bar.update(1)
            if loop.consecutive_bad >= config.training.max_nonfinite_steps:
                run.checkpoint(loop)
                run.poll_saves(wait=True)
                _close(bar, logger)
                raise RunError(f"training stopped at step {loop.step}: {loop.consecutive_bad} consecutive steps had "
                               f"a non-finite loss or gradient. A checkpoint was saved in {run_dir}/checkpoints. "
                               "Lower --lr, keep --grad-clip on, or try --no-amp, then --resume-from latest")
            saved = _periodic(run, loop, outcome, bar)
            run.poll_saves()
            if loop.stop_signal is not None or loop.out_of_time:
                if not saved:
                    run.checkpoint(loop)
                break
    if bar is not None:
        bar.close()
    return model, _finish(loop, run, tok_rate)


def _precision_for(model, config, caps) -> Precision:
    precision = choose_precision(config, caps)
    if precision.scaler is not None and expert_parallel_of(unwrap(model)) is not None:
        # each rank's loss-scale check would see only its own experts' overflows: the ranks could part ways
        raise ConfigError("expert_parallel", "--expert-parallel trains in bf16 or fp32, not fp16 with a loss scale "
                                             "(this GPU has no bf16): give --no-amp")
    return precision


def _run_dir(config, run_dir) -> Path:
    """The run directory given, else the config's (a default one named for the run when it has none)."""
    if run_dir is None and config.training.out_dir is None:
        from ..runs.layout import default_run_dir

        config.derive(out_dir=str(default_run_dir(config)))
    return Path(run_dir or config.training.out_dir)


def _follow_the_plan(run: _Run, loop: LoopState, step_time: float, bar) -> None:
    """A time budget's run: settle the length once the probe is over, then end early if time runs out."""
    planner, config = run.planner, run.config
    if planner is None:
        return
    if planner.observe(loop.step, step_time):
        run.settle_plan(loop, bar)
    elif loop.step < config.training.max_steps and _any_rank(run.ctx, planner.out_of_time()):
        loop.out_of_time = True
        log(f"The time budget ends the run at step {loop.step} of {config.training.max_steps}: the steps or the "
            "scoring were slower than measured")


def _any_rank(ctx: DistContext, flag: bool) -> bool:
    """Whether any rank raises `flag` (every rank learns the same answer)."""
    return ctx.all_reduce_sum([float(flag)])[0] > 0 if ctx.enabled else flag


def _count_outcome(loop: LoopState, outcome: str, record: dict) -> None:
    if outcome == "stepped":
        loop.consecutive_bad = 0
        return
    loop.skipped += 1
    loop.consecutive_bad += 1
    log(f"step {loop.step}: non-finite loss or gradient (loss {record['loss']}, grad norm {record['grad_norm']}); "
        f"step skipped ({loop.skipped} so far)")


def _periodic(run: _Run, loop: LoopState, outcome: str, bar=None) -> bool:
    """Evaluate and checkpoint when due; True when a checkpoint of this step was written. A plan settled or
    revised at this step is saved with it (once): a resume keeps the plan."""
    saved = _evaluate_and_save_when_due(run, loop, outcome, bar)
    if run.plan_unsaved and not saved:
        run.checkpoint(loop)
        saved = True
    run.plan_unsaved = False
    return saved


def _evaluate_and_save_when_due(run: _Run, loop: LoopState, outcome: str, bar=None) -> bool:
    config, step = run.config, loop.step
    if outcome == "overflow":
        return False
    final = step == config.training.max_steps or loop.out_of_time
    if step % config.training.eval_every == 0 or final:
        is_best = run.evaluate(loop)
        if not final:
            run.revise_plan(loop, bar)
        if step % config.training.checkpoint_every == 0 or final or is_best or run.plan_unsaved:
            run.checkpoint(loop, is_best=is_best)
            return True
    elif step % config.training.checkpoint_every == 0:
        run.checkpoint(loop)
        return True
    return False


def _finish(loop: LoopState, run: _Run, tok_rate) -> dict:
    run.poll_saves(wait=True)  # the last checkpoint is committed before the run says it is done
    run_dir = run.run_dir
    if loop.stop_signal is not None:
        log(f"Stopped by {signal.Signals(loop.stop_signal).name} at step {loop.step}; checkpoint saved in "
            f"{run_dir}/checkpoints.\nResume with: python train.py --resume-from {run_dir}")
    metrics = {"step": loop.step, "skipped_steps": loop.skipped, "overflow_steps": loop.overflows,
               "elapsed": loop.elapsed,
               "stopped_by_signal": loop.stop_signal is not None, "stop_signal": loop.stop_signal,
               "stopped_by_budget": loop.out_of_time,
               **({"plan": run.planner.plan} if run.planner is not None else {}),
               "train_tokens_per_sec": tok_rate or 0.0, "best_val_loss": loop.best_val, **loop.last_eval}
    if run.ctx.is_main:
        if run.logger.records:
            plot_run(run.logger.records, run_dir)
        write_summary(run_dir, metrics)
    run.logger.log_summary(metrics)
    run.logger.close()
    return metrics


def _progress_bar(config, initial: int):
    from tqdm.auto import tqdm

    return tqdm(total=config.training.max_steps, initial=initial, desc="train", dynamic_ncols=True)


def _close(bar, logger) -> None:
    if bar is not None:
        bar.close()
    logger.close()
