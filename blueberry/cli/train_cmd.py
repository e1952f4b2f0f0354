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
    if config.init_from:
        from ..training.init_from import MODEL_FIELDS, apply_init_from

        clash = sorted(set(overrides) & set(MODEL_FIELDS + ("tokenizer",)))
        if clash:
            raise ConfigError(clash[0], f"cannot be set with --init-from, whose model it is (here: "
                              f"{config.init_from}); drop it, or train from scratch")
        config = apply_init_from(config)
    return config.validate()


def train_command(args) -> int:
    if args.resume_from:
        return _resume(args)
    config = config_from_args(args)
    if args.validate_setup:
        from .validate_setup import validate_setup

        return validate_setup(config)
    lrs = getattr(args, "lr", None) or []
    if len(lrs) > 1:
        from ..training.sweep import run_lr_sweep

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
    from ..training.checkpoint import read_state, resolve_checkpoint, run_dir_of
    from ..training.run import run_training
    from .args import overrides_from

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
