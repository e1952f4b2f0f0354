"""One training run from a config: process group, data, model, run directory, `train_model`, summary.

This is what `python train.py` calls; an LR sweep calls it once per learning rate.
"""

from __future__ import annotations

import time
import traceback
from pathlib import Path

import torch
import torch._dynamo

from ..data import create_dataloaders, open_corpus
from ..data.loaders import first_shard, split_tokens
from ..errors import CheckpointError, UsageError
from ..logs import get_logger
from ..models import create_model
from ..runs.checkpoint import clean_stale_temporaries, load_weights
from ..runs.layout import TOKENIZER, default_run_dir, prepare_run_dir, write_config, write_summary
from ..system import set_cpu_threads
from .activation_checkpointing import apply_activation_checkpointing
from .budget import StepPlanner, budget_seconds, planning, run_started
from .distributed import init_distributed, teardown, wrap_model
from .expert_parallel import apply_expert_parallel, check_expert_parallel, expert_parallel_of
from .float8 import apply_float8
from .init_from import load_initial_weights
from .memory import check_fits, choose_checkpointing
from .size_plan import plan_size
from .test_split import score_test_split
from .trainer import train_model

log = get_logger(__name__).info


def resolve_device(config) -> torch.device:
    caps = config.capabilities()
    if config.training.device:
        if config.training.device.startswith("cuda") and not torch.cuda.is_available():
            raise UsageError(f"--device {config.training.device}: no CUDA device is available here; use --device cpu")
        return torch.device(config.training.device)
    return torch.device("cuda" if caps.is_cuda else "cpu")


def build_everything(config, rank: int = 0, world_size: int = 1):
    """Data, tokenizer, model and loaders for `config` (used by training, eval and validate-setup)."""
    tokenizer, corpus, train_loader, val_loader = build_data(config, rank, world_size)
    return tokenizer, corpus, create_model(config), train_loader, val_loader


def build_data(config, rank: int = 0, world_size: int = 1):
    """(tokenizer, corpus, train loader, validation loader) of `config`, the data cache built on first use."""
    tokenizer, corpus = open_corpus(config)
    if tokenizer.vocab_size > config.model.vocab_size:
        if "vocab_size" in config.auto_fields:
            config.derive(vocab_size=(tokenizer.vocab_size + 63) // 64 * 64)
            log(f"vocab_size set to {config.model.vocab_size} to fit the tokenizer ({tokenizer.vocab_size} ids)")
        else:
            raise UsageError(f"--vocab-size {config.model.vocab_size} is smaller than the tokenizer's "
                             f"{tokenizer.vocab_size} ids; pass --vocab-size {tokenizer.vocab_size} or more")
    train_loader, val_loader = create_dataloaders(config, corpus, rank=rank, world_size=world_size)
    return tokenizer, corpus, train_loader, val_loader


def sample_prompts(tokenizer, corpus, n: int = 2, tokens: int = 8) -> tuple[str, ...]:
    """Openings of the first validation documents: prompts the model has never trained on."""
    shard, prompts = first_shard(corpus, "val"), []
    for start in list(shard.doc_starts[:n]):
        ids = [int(t) for t in shard.tokens[int(start) + 1:int(start) + 1 + tokens]]
        prompts.append(tokenizer.decode(ids))
    return tuple(prompts) or ("\n",)


def run_training(config, resume_state: dict | None = None, resume_checkpoint: Path | None = None,
                 task_scorer_factory=None, progress: bool = True):
    """Train one run (under torchrun: this process's share); returns (plain model, metrics).
    `task_scorer_factory(config, tokenizer)` may return a function scoring tasks at evaluations."""
    ctx = init_distributed(device_type(config))
    try:
        return train_in_group(config, ctx, resume_state, resume_checkpoint, task_scorer_factory, progress)
    except BaseException as exc:
        # the traceback's frames hold the wrapped model; free them so that teardown can drop it first
        traceback.clear_frames(exc.__traceback__)
        raise
    finally:
        teardown(ctx)


def device_type(config) -> str:
    if config.training.device:
        return "cuda" if config.training.device.startswith("cuda") else "cpu"
    return "cuda" if config.capabilities().is_cuda else "cpu"


def train_in_group(config, ctx, resume_state, resume_checkpoint, task_scorer_factory, progress: bool = True):
    """One run in the process group `ctx` (which the caller owns): train, summarise, score the test split."""
    check_expert_parallel(config, ctx.world_size)
    device = resolve_device(config)
    if ctx.enabled and device.type == "cuda":
        device = torch.device("cuda", ctx.local_rank)
    if device.type == "cpu":
        set_cpu_threads()
    run_dir = Path(config.training.out_dir) if config.training.out_dir else default_run_dir(config)
    config.derive(out_dir=str(run_dir))
    if ctx.is_main:
        # a resume continues the run directory its checkpoint is in; any other --out-dir is checked as new
        here = resume_checkpoint is not None and Path(resume_checkpoint).resolve().is_relative_to(run_dir.resolve())
        prepare_run_dir(run_dir, resuming=resume_state is not None and here)
        clean_stale_temporaries(run_dir)
    torch.manual_seed(config.training.seed)
    started, plan = budget_clock(config, resume_state)
    tokenizer, corpus, model, train_loader, val_loader, plan = _build_on_every_rank(config, ctx, plan, started,
                                                                                     device)
    if resume_state is not None:
        check_resumable(resume_state, resume_checkpoint, tokenizer, ctx, config)
        _say_repartition(resume_state, config, ctx)
        load_weights(resume_checkpoint, model)
    elif config.training.init_from:
        load_initial_weights(model, config.training.init_from)
        log(f"Initialised from {config.training.init_from}")
    model.to(device)
    if device.type == "cuda" and "batch_size" in config.auto_fields and resume_state is None:
        train_loader, val_loader = _fit_batch_to_gpu(model, config, device, corpus, ctx,
                                                     (train_loader, val_loader))
    if resume_state is None:  # a resumed run keeps the choices it made
        _settle_machine_choices(model, config, device, ctx)
    config.validate()
    if ctx.is_main:
        write_config(run_dir, config)
        tokenizer.save(run_dir / TOKENIZER)
        rep = model.parameter_report()
        log(f"Model: {rep['total']:,} parameters, {rep['active_per_token']:,} active per token")
    check_fits(model, config, device, ctx.world_size)
    wrapped = _wrap(model, config, ctx)
    planner = StepPlanner(config, plan, started) if plan is not None else None
    try:
        _, metrics = train_model(
            wrapped, train_loader, val_loader, config, run_dir=run_dir, tokenizer=tokenizer,
            token_bytes=corpus.token_bytes, resume_state=resume_state, resume_checkpoint=resume_checkpoint, ctx=ctx,
            sample_prompts=sample_prompts(tokenizer, corpus), progress=progress,
            task_scorer=task_scorer_factory(config, tokenizer) if task_scorer_factory else None, planner=planner)
    finally:
        if hasattr(train_loader, "stop"):
            train_loader.stop()  # the loader's read-ahead thread
    if expert_parallel_of(model) is not None:
        expert_parallel_of(model).gather()  # every expert on every rank again: the test split, the summary
    del wrapped  # the DDP reducer must go before the process group (see distributed.teardown)
    if ctx.is_main:
        print_summary(metrics, run_dir)
    if config.data.test_fraction > 0 and metrics.get("stop_signal") is None:
        score_test_split(model, config, tokenizer, ctx, run_dir, metrics, corpus)
    if planner is not None and ctx.is_main:  # the whole command's wall beside the plan's
        metrics["wall_s"] = time.time() - planner.started
        write_summary(run_dir, metrics)
        log(f"Wall time {metrics['wall_s']:.0f} s of the {planner.budget:.0f} s budget "
            f"(planned {planner.plan.get('planned_wall_s', float('nan')):.0f} s)")
    return model, metrics


def budget_clock(config, resume_state: dict | None) -> tuple[float | None, dict | None]:
    """(when the budget began, the plan so far) of a run a time budget governs, else (None, None). A new run
    plans from scratch ({}), or is only limited by the budget (its --max-steps given); a run stopped during
    its probe continues it; a resumed run whose plan is settled keeps it, with no clock (the budget was its
    first command's)."""
    budget = budget_seconds(config)
    if budget is None:
        return None, None
    if resume_state is None:
        return run_started(), ({} if planning(config) else {"time_budget_s": budget, "fixed_length": True})
    if planning(config) and resume_state.get("plan"):
        return time.time() - resume_state.get("elapsed", 0.0), dict(resume_state["plan"])
    return None, None


def _build_on_every_rank(config, ctx, plan: dict | None, started: float | None, device):
    """Rank 0 builds (and caches) the data first; the other ranks then read the cache. A new plan ({}) chooses
    the size and the provisional length before the model is built (training.size_plan). Returns (tokenizer,
    corpus, model, train loader, val loader, plan)."""
    if ctx.is_main:
        data = build_data(config, ctx.rank, ctx.world_size)
    ctx.barrier()
    if not ctx.is_main:
        data = build_data(config, ctx.rank, ctx.world_size)
    tokenizer, corpus, train_loader, val_loader = data
    if plan == {}:
        plan = plan_size(config, corpus.n_train, ctx, device, started, budget_seconds(config), log)
    if plan is not None and config.data.test_fraction > 0:
        plan["test_tokens"] = split_tokens(corpus, "test")
    return tokenizer, corpus, create_model(config), train_loader, val_loader, plan


def check_resumable(state: dict, checkpoint: Path, tokenizer, ctx, config) -> None:
    """Refuse a resume that could not continue where the run stopped: another tokenizer or engine, or another
    world size where the data position cannot be re-partitioned (see data_position.repartition_refusal).
    Weights and optimizer states reshard: a sharded checkpoint on read, a single-file one holds them whole."""
    from ..data.data_position import repartition_refusal

    if state.get("tokenizer") != tokenizer.identity:
        raise CheckpointError(f"{checkpoint} was trained with a different tokenizer "
                              f"({state.get('tokenizer')}) than this data gives "
                              f"({tokenizer.identity}); resume with the same --dataset and --tokenizer")
    written = state.get("world_size", 1)
    why = repartition_refusal(state.get("data") or {}) if written != ctx.world_size else None
    if why:
        raise CheckpointError(f"{checkpoint} was written by {written} process(es) and cannot continue on "
                              f"{ctx.world_size}: {why}; resume it with the same --nproc_per_node ({written})")
    if ctx.enabled and written > 1 and state.get("parallel", "ddp") != config.training.parallel:
        raise CheckpointError(f"{checkpoint} was written with --parallel "
                              f"{state.get('parallel')}; resume it with the same engine")


def _say_repartition(state: dict, config, ctx) -> None:
    written = state.get("world_size", 1)
    if written != ctx.world_size:
        saved = state.get("config", {}).get("batch_size")
        log(f"Resuming a checkpoint of {written} process(es) on {ctx.world_size}: the data continues at sample "
            f"{state['data'].get('consumed')} of epoch {state['data'].get('epoch')}; {config.training.batch_size} "
            f"sequences per process make {config.training.batch_size * ctx.world_size} per step (the writer's: "
            f"{saved * written if saved else '?'}; --batch-size keeps it)")


def _fit_batch_to_gpu(model, config, device, corpus, ctx, loaders):
    from .auto_batch import auto_batch_size
    from .precision import choose_precision

    micro, accum = auto_batch_size(model, config, device, choose_precision(config, config.capabilities()))
    if (micro, accum) == (config.training.batch_size, config.training.grad_accum_steps):
        return loaders
    log(f"Auto batch size: micro-batch {micro} x {accum} accumulation steps "
        f"(keeps {config.training.batch_size * config.training.grad_accum_steps} sequences per optimizer step)")
    config.derive(batch_size=micro, grad_accum_steps=accum)
    return create_dataloaders(config, corpus, rank=ctx.rank, world_size=ctx.world_size)


def _settle_machine_choices(model, config, device, ctx) -> None:
    """What was left to the machine and needs the built model: FP8 (`--fp8 auto`: kept only where it
    measured faster on every rank) and activation checkpointing (the least with which the run fits)."""
    from .fp8_choice import choose_fp8

    if config.training.use_fp8 and "use_fp8" in config.auto_fields:
        faster = choose_fp8(model, config, config.data.cache_dir)
        if ctx.all_reduce_sum([float(faster)])[0] < ctx.world_size:
            config.derive(use_fp8=False)
    if "activation_checkpointing" in config.auto_fields:
        mode = choose_checkpointing(model, config, device, ctx.world_size)
        if mode != config.training.activation_checkpointing:
            log(f"Activation checkpointing {mode}: without it the run would not fit in memory")
            config.derive(activation_checkpointing=mode)


def _wrap(model, config, ctx):
    """Transforms applied from outside, in torchtitan's order: FP8 linears, activation checkpointing,
    expert parallelism and DDP/FSDP2 under torchrun, then torch.compile when asked."""
    model = apply_float8(model, bool(config.training.use_fp8), fsdp=ctx.enabled and config.training.parallel == "fsdp")
    model = apply_activation_checkpointing(model, config.training.activation_checkpointing)
    if ctx.enabled:
        apply_expert_parallel(model, config.training.expert_parallel)
    precision_dtype = config.capabilities().autocast_dtype if config.training.use_amp else None
    model = wrap_model(model, ctx, config.training.parallel, precision_dtype)
    if config.training.compile:
        # a machine without a working C++ toolchain gets eager mode and a warning, not a crash
        torch._dynamo.config.suppress_errors = True
        model = torch.compile(model)
    return model


def print_summary(metrics: dict, run_dir: Path) -> None:
    def fmt(key, spec):
        return format(metrics[key], spec) if key in metrics else "n/a"

    log("")
    log(f"Run directory: {run_dir}")
    log(f"  val loss       {fmt('loss', '.4f')}")
    log(f"  perplexity     {fmt('perplexity', '.2f')}")
    log(f"  accuracy       {fmt('accuracy', '.4f')}")
    log(f"  bits per byte  {fmt('bits_per_byte', '.4f')}")
    log(f"  train tokens/s {fmt('train_tokens_per_sec', ',.0f')}")
    for key in sorted(k for k in metrics if k.endswith("/acc")):
        task = key[:-4]
        log(f"  {task:<28} acc {metrics[key]:.4f}, acc_norm {metrics[task + '/acc_norm']:.4f}, "
            f"centered {metrics[task + '/centered']:.4f}")
