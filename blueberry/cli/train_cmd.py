"""`train`: build the config from preset/file + flags, then validate-setup, one run, a resume, or a sweep."""

from __future__ import annotations

from ..configs import AdaptiveMoEModelConfig, get_config, load_config_file
from ..errors import ConfigError


def config_from_args(args) -> AdaptiveMoEModelConfig:
    from .args import overrides_from

    overrides = overrides_from(args)
    lrs = overrides.pop("lr", None)
    if lrs is not None:
        overrides["lr"] = lrs[0]
    if args.config.endswith((".yaml", ".yml", ".json")):
        config = AdaptiveMoEModelConfig(**{**load_config_file(args.config), **overrides})
    else:
        config = get_config(args.config, **overrides)
    if config.training.init_from:
        from ..training.init_from import MODEL_FIELDS, apply_init_from

        clash = sorted(set(overrides) & set(MODEL_FIELDS + ("tokenizer",)))
        if clash:
            raise ConfigError(clash[0], f"cannot be set with --init-from, whose model it is (here: "
                              f"{config.training.init_from}); drop it, or train from scratch")
        config = apply_init_from(config)
    return config.validate()


def train_command(args) -> int:
    if args.resume_from:
        return _resume(args)
    config = config_from_args(args)
    if args.dry_run:
        from ..training.plan import describe_plan

        print("\n".join(describe_plan(config, preset=args.config)))
        return 0
    if args.validate_setup:
        from .validate_setup import validate_setup

        return validate_setup(config)
    lrs = getattr(args, "lr", None) or []
    if config.training.ensemble > 1:
        if len(lrs) > 1:
            raise ConfigError("ensemble", "an LR sweep trains one run per learning rate: sweep with --ensemble 1")
        if config.training.time_budget and "max_steps" in config.auto_fields:
            raise ConfigError("time_budget", "an ensemble's members are planned by steps, not a time budget: give "
                              "--max-steps, or train the runs one by one and combine them with blueberry ensemble")
        from ..evaluation.run_tasks import task_scorer_factory
        from ..training.ensemble import run_ensemble

        _, metrics = run_ensemble(config, task_scorer_factory=task_scorer_factory)
        return exit_code(metrics)
    if len(lrs) > 1:
        from ..training.sweep import run_lr_sweep

        if config.training.time_budget and "max_steps" in config.auto_fields:
            raise ConfigError("max_steps", "an LR sweep compares learning rates at one length: give --max-steps "
                              "(a time budget would plan each run's length and size apart)")

        from ..evaluation.run_tasks import task_scorer_factory

        results = run_lr_sweep(config, lrs, task_scorer_factory=task_scorer_factory)
        return exit_code(results[-1]) if results else 0
    from ..evaluation.run_tasks import task_scorer_factory
    from ..training.run import run_training

    _, metrics = run_training(config, task_scorer_factory=task_scorer_factory)
    return exit_code(metrics)


def exit_code(metrics: dict) -> int:
    """0 for a finished run; 128 + the signal for one stopped by SIGINT (130) or SIGTERM (143), so that a
    scheduler can tell a preempted run (saved, resumable) from a finished one."""
    signum = metrics.get("stop_signal")
    return 128 + int(signum) if signum else 0


def _resume(args) -> int:
    from ..runs.checkpoint import read_state, resolve_checkpoint, resolve_run, run_dir_of
    from ..runs.ensemble_dir import is_ensemble
    from ..training.run import run_training
    from .args import overrides_from

    if is_ensemble(resolve_run(args.resume_from, run_dir=getattr(args, "out_dir", None))):
        return _resume_ensemble(args)
    ckpt = resolve_checkpoint(args.resume_from, run_dir=getattr(args, "out_dir", None))
    state = read_state(ckpt)
    saved = AdaptiveMoEModelConfig.from_dict(state["config"])
    overrides = overrides_from(args)
    if "lr" in overrides:
        if len(overrides["lr"]) > 1:
            raise ConfigError("lr", "a resumed run continues one learning rate; give --lr once")
        overrides["lr"] = overrides["lr"][0]
    overrides.setdefault("out_dir", str(run_dir_of(ckpt)))
    config = saved.replace(**overrides).validate()
    from ..evaluation.run_tasks import task_scorer_factory

    print(f"Resuming from {ckpt}")
    _, metrics = run_training(config, resume_state=state, resume_checkpoint=ckpt,
                              task_scorer_factory=task_scorer_factory)
    return exit_code(metrics)


def _resume_ensemble(args) -> int:
    """Finish a stopped ensemble run: the members it has not finished continue (see training.ensemble)."""

    from ..evaluation.run_tasks import task_scorer_factory
    from ..runs.checkpoint import resolve_run
    from ..runs.ensemble_dir import refuse_to_resume_combined
    from ..runs.layout import read_config
    from ..training.ensemble import run_ensemble
    from .args import overrides_from

    run_dir = resolve_run(args.resume_from, run_dir=getattr(args, "out_dir", None))
    refuse_to_resume_combined(run_dir)
    extra = [name for name in overrides_from(args) if name != "out_dir"]
    if extra:
        raise ConfigError(extra[0], "an ensemble resumes with its own settings: drop the "
                          "flag (or resume one member's run directory with it)")
    config = read_config(run_dir)
    print(f"Resuming the ensemble {run_dir}")
    _, metrics = run_ensemble(config.replace(out_dir=str(run_dir)).validate(), resuming=True,
                              task_scorer_factory=task_scorer_factory)
    return exit_code(metrics)
