"""One training run from a config: process group, data, model, run directory, `train_model`, summary.

This is what `python train.py` calls; an LR sweep calls it once per learning rate.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import torch
import torch._dynamo

from ..configs import save_config
from ..data import create_dataloaders, load_and_cache_data
from ..errors import CheckpointError, UsageError
from ..models import create_model
from ..system import set_cpu_threads
from .checkpoint import clean_stale_temporaries, load_weights
from .distributed import cleanup, init_distributed, wrap_model
from .trainer import train_model


def default_run_dir(config) -> Path:
    return Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{config.model_type}"


def prepare_run_dir(run_dir: Path, resuming: bool) -> None:
    """Create the run directory and prove it is writable before any training starts."""
    if not resuming and (run_dir / "checkpoints").exists() and any((run_dir / "checkpoints").iterdir()):
        raise UsageError(f"--out-dir {run_dir} already holds a run with checkpoints; continue it with "
                         f"--resume-from {run_dir}, or choose another --out-dir (nothing was overwritten)")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}"
        probe.write_bytes(b"0" * 1024)
        probe.unlink()
    except OSError as exc:
        raise UsageError(f"--out-dir {run_dir} is not writable ({exc.strerror}); choose a directory you can "
                         "write to") from None
    free = shutil.disk_usage(run_dir).free
    if free < 50 * 2**20:
        raise UsageError(f"--out-dir {run_dir}: only {free / 2**20:.0f} MiB free on that disk; free some space "
                         "or choose another directory")


def resolve_device(config) -> torch.device:
    caps = config.capabilities()
    if config.device:
        if config.device.startswith("cuda") and not torch.cuda.is_available():
            raise UsageError(f"--device {config.device}: no CUDA device is available here; use --device cpu")
        return torch.device(config.device)
    return torch.device("cuda" if caps.is_cuda else "cpu")


def build_everything(config, log=print, rank: int = 0, world_size: int = 1):
    """Data, tokenizer, model and loaders for `config` (used by training, eval and validate-setup)."""
    texts, tokenizer, corpus = load_and_cache_data(config, log=log)
    if tokenizer.vocab_size > config.vocab_size:
        if "vocab_size" in config.auto_fields:
            config.vocab_size = (tokenizer.vocab_size + 63) // 64 * 64
            log(f"vocab_size set to {config.vocab_size} to fit the tokenizer ({tokenizer.vocab_size} ids)")
        else:
            raise UsageError(f"--vocab-size {config.vocab_size} is smaller than the tokenizer's "
                             f"{tokenizer.vocab_size} ids; pass --vocab-size {tokenizer.vocab_size} or more")
    train_loader, val_loader = create_dataloaders(config, corpus, rank=rank, world_size=world_size)
    model = create_model(config)
    return tokenizer, corpus, model, train_loader, val_loader


def sample_prompts(tokenizer, corpus, n: int = 2, tokens: int = 8) -> tuple[str, ...]:
    """Openings of the first validation documents: prompts the model has never trained on."""
    prompts = []
    for start in list(corpus.val_doc_starts[:n]):
        ids = [int(t) for t in corpus.val[int(start) + 1:int(start) + 1 + tokens]]
        prompts.append(tokenizer.decode(ids))
    return tuple(prompts) or ("\n",)


def run_training(config, resume_state: dict | None = None, resume_checkpoint: Path | None = None, log=print):
    device_type = "cuda" if (config.device or "").startswith("cuda") or (
        config.device is None and config.capabilities().is_cuda) else "cpu"
    ctx = init_distributed(device_type)
    quiet = (lambda *a, **k: None)
    say = log if ctx.is_main else quiet
    try:
        device = resolve_device(config)
        if ctx.enabled and device.type == "cuda":
            device = torch.device("cuda", ctx.local_rank)
        if device.type == "cpu":
            set_cpu_threads()
        run_dir = Path(config.out_dir) if config.out_dir else default_run_dir(config)
        config.out_dir = str(run_dir)
        if ctx.is_main:
            prepare_run_dir(run_dir, resuming=resume_state is not None)
            clean_stale_temporaries(run_dir)
        torch.manual_seed(config.seed)
        if ctx.is_main:
            tokenizer, corpus, model, train_loader, val_loader = build_everything(config, say, ctx.rank, ctx.world_size)
        ctx.barrier()  # rank 0 built the cache; the others now read it
        if not ctx.is_main:
            tokenizer, corpus, model, train_loader, val_loader = build_everything(config, quiet, ctx.rank, ctx.world_size)
        if resume_state is not None:
            if resume_state.get("tokenizer") != tokenizer.identity:
                raise CheckpointError(f"{resume_checkpoint} was trained with a different tokenizer "
                                      f"({resume_state.get('tokenizer')}) than this data gives "
                                      f"({tokenizer.identity}); resume with the same --dataset and --tokenizer")
            if resume_state.get("world_size", 1) != ctx.world_size:
                raise CheckpointError(f"{resume_checkpoint} was written by {resume_state.get('world_size', 1)} "
                                      f"process(es); resume it with the same --nproc_per_node "
                                      f"(now {ctx.world_size}) so that the data position continues exactly")
            if ctx.enabled and resume_state.get("parallel", "ddp") != config.parallel:
                raise CheckpointError(f"{resume_checkpoint} was written with --parallel "
                                      f"{resume_state.get('parallel')}; resume it with the same engine")
            load_weights(resume_checkpoint, model)
        model.to(device)
        if device.type == "cuda" and "batch_size" in config.auto_fields and resume_state is None:
            from .auto_batch import auto_batch_size
            from .precision import choose_precision

            micro, accum = auto_batch_size(model, config, device, choose_precision(config, config.capabilities()))
            if (micro, accum) != (config.batch_size, config.grad_accum_steps):
                say(f"Auto batch size: micro-batch {micro} x {accum} accumulation steps "
                    f"(keeps {config.batch_size * config.grad_accum_steps} sequences per optimizer step)")
                config.batch_size, config.grad_accum_steps = micro, accum
                train_loader, val_loader = create_dataloaders(config, corpus, rank=ctx.rank,
                                                              world_size=ctx.world_size)
        config.validate()
        if ctx.is_main:
            save_config(config, run_dir / "config.json")
            tokenizer.save(run_dir / "tokenizer.json")
            rep = model.parameter_report()
            say(f"Model: {rep['total']:,} parameters, {rep['active_per_token']:,} active per token")
        precision_dtype = config.capabilities().autocast_dtype if config.use_amp else None
        model = wrap_model(model, ctx, config.parallel, precision_dtype)
        if config.compile:
            # a machine without a working C++ toolchain gets eager mode and a warning, not a crash
            torch._dynamo.config.suppress_errors = True
            model = torch.compile(model)
        model, metrics = train_model(
            model, train_loader, val_loader, config, run_dir=run_dir, tokenizer=tokenizer,
            token_bytes=corpus.token_bytes, resume_state=resume_state, ctx=ctx, log=say,
            sample_prompts=sample_prompts(tokenizer, corpus))
        if ctx.is_main:
            print_summary(metrics, run_dir, say)
        ctx.barrier()  # every rank done with its last collective before the group is torn down
        return model, metrics
    finally:
        cleanup()


def print_summary(metrics: dict, run_dir: Path, log=print) -> None:
    def fmt(key, spec):
        return format(metrics[key], spec) if key in metrics else "n/a"

    log("")
    log(f"Run directory: {run_dir}")
    log(f"  val loss       {fmt('loss', '.4f')}")
    log(f"  perplexity     {fmt('perplexity', '.2f')}")
    log(f"  accuracy       {fmt('accuracy', '.4f')}")
    log(f"  bits per byte  {fmt('bits_per_byte', '.4f')}")
    log(f"  train tokens/s {fmt('train_tokens_per_sec', ',.0f')}")
