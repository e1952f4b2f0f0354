"""`TrainingConfig`: how a run goes — batch, length, evaluation and checkpoints, device, precision, engine."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError
from .fields import (ACTIVATION_CHECKPOINTING, PARALLEL, check_choices, check_positive, parse_duration, parse_trackers,
                     setting)


@dataclass
class TrainingConfig:
    batch_size: int | None = setting(None, "sequences per micro-batch per process (default: sized to the device)")
    grad_accum_steps: int = setting(1, "micro-batches per optimizer step", flag="grad_accum")
    max_steps: int | None = setting(None, "optimizer steps (given, they are the run's length; left out, the run plans "
                                          "its length from --time-budget)")
    time_budget: str | None = setting(None, "wall budget of the whole command: 45s, 10m, 2h, 1h30m. The run measures "
                                            "its step and plans its length to end within it (default: 10m when "
                                            "--max-steps is not given); with --max-steps, a limit that ends it early")
    eval_every: int | None = setting(None, "evaluate every this many steps")
    eval_batches: int = setting(20, "validation batches per evaluation")
    checkpoint_every: int | None = setting(None, "checkpoint every this many steps")
    keep_checkpoints: int = setting(2, "periodic checkpoints kept (the best is kept apart)")
    async_checkpoint: bool = setting(False, "under --parallel fsdp: write each sharded checkpoint in a background "
                                            "thread while the next steps train (it is committed once written)")
    max_nonfinite_steps: int = setting(5, "stop after this many non-finite steps in a row")
    sample_tokens: int = setting(48, "tokens sampled at each evaluation")
    seed: int = setting(1337, "random seed of initialisation, batches and sampling")
    device: str | None = setting(None, "cpu, cuda or cuda:N (default: the best one present)")
    out_dir: str | None = setting(None, "run directory (default runs/<date>-<time>-<model>)")
    use_amp: bool | None = setting(None, "mixed precision where the hardware pays for it (--no-amp: fp32)",
                                   flag="amp")
    use_fp8: bool | None = setting(None, "FP8 linears and expert matmuls via torchao: on, off, or auto (the default: "
                                         "where the GPU supports it and a timed step at the run's shapes is faster)",
                                   flag="fp8", auto_on_off=True)
    compile: bool | None = setting(None, "torch.compile the model (default: for runs of 150 steps or more)")
    parallel: str = setting("ddp", "engine under torchrun", choices=PARALLEL)
    expert_parallel: int = setting(1, "under torchrun: each group of N ranks shares every MoE layer's experts (each "
                                      "holds num_experts / N) and exchanges tokens with all-to-alls; the rest of the "
                                      "model stays data-parallel (--parallel ddp, or fsdp sharding it)")
    activation_checkpointing: str = setting(
        "none", "recompute activations in the backward pass instead of keeping them: none, selective (keep the "
                "matmul outputs, recompute the rest) or full (keep only each block's input) (default: none, or the "
                "least that makes the run fit the device's memory)", choices=ACTIVATION_CHECKPOINTING)
    init_from: str | None = setting(None, "start from these weights: a transformers model directory or a Blueberry "
                                          "run (its architecture and tokenizer replace the model settings)")
    eval_tasks: str = setting("auto", "multiple-choice tasks scored at the final evaluation: built-in names or "
                                      ".jsonl paths, comma-separated; auto: the built-in tasks of the dataset; none")
    eval_tasks_periodic: bool = setting(False, "score --eval-tasks at every evaluation, not only the last")
    tracker: str = setting("tensorboard", "experiment trackers beside metrics.jsonl, comma-separated: tensorboard, "
                                          "wandb, mlflow, trackio; none: metrics.jsonl only (the others need "
                                          "pip install 'blueberry[trackers]')")
    ensemble: int | None = setting(None, "train this many runs of the recipe (seeds --seed, --seed + 1, ...) and use "
                                         "them as one model, the mean of their next-token distributions (default: 1, "
                                         "one model; `blueberry ensemble` combines finished runs)")

    def validate(self) -> "TrainingConfig":
        check_positive(self, "batch_size", "grad_accum_steps", "max_steps", "eval_every", "eval_batches",
                       "checkpoint_every", "keep_checkpoints", "max_nonfinite_steps", "expert_parallel")
        check_positive(self, "ensemble", optional=True)  # None in a checkpoint older than the field: one run
        check_choices(self)
        try:
            parse_trackers(self.tracker)
        except ValueError as e:
            raise ConfigError("tracker", str(e)) from None
        if self.time_budget is not None:
            try:
                parse_duration(self.time_budget)
            except ValueError as e:
                raise ConfigError("time_budget", str(e)) from None
        return self
