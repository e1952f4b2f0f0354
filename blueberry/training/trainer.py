"""`train_model`: the training loop, top to bottom.

Per optimizer step: `grad_accum_steps` micro-batches (forward under autocast, backward, DDP sync on
the last only) -> unscale + clip -> skip the step if the loss or gradient is not finite -> optimizer
steps -> one LR-schedule step. Every step is logged; every `eval_every` steps the model is evaluated,
samples are written and plots redrawn; every `checkpoint_every` steps (and at the end, and on
SIGINT/SIGTERM) a checkpoint is written atomically.
"""

from __future__ import annotations

import json
import math
import random
import signal
import time
from pathlib import Path

import numpy as np
import torch

from ..errors import RunError
from ..models.generation import generate_text
from ..optimizers import get_lr_scheduler, setup_optimizers
from .checkpoint import check_optimizer_layout, save_checkpoint
from .distributed import (DistContext, gathered_states, is_sharded, load_sharded_optimizer_states, no_sync,
                          scalar)
from .evaluation import evaluate_model
from .metrics import MetricsLogger
from .plots import plot_run
from .precision import Precision, choose_precision


class StopRequest:
    """SIGINT/SIGTERM set a flag; the loop finishes its step, saves and exits cleanly."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.requested:  # second signal: stop now
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _core(model):
    """The plain model inside torch.compile and DDP wrappers."""
    while hasattr(model, "_orig_mod") or hasattr(model, "module"):
        model = getattr(model, "_orig_mod", None) or model.module
    return model


def _write_samples(model, tokenizer, corpus_prompts, run_dir: Path, step: int, config, write: bool) -> list[str]:
    texts = []
    for i, prompt in enumerate(corpus_prompts):
        cont = generate_text(_core(model), tokenizer, prompt, max_new_tokens=config.sample_tokens,
                             temperature=0.8, top_k=50, seed=config.seed + i, eos=tokenizer.eot_id)
        texts.append(prompt + cont)
    if not write:
        return texts
    with open(run_dir / "samples.txt", "a", encoding="utf-8") as f:
        f.write(f"===== step {step} =====\n")
        for t in texts:
            f.write(t.strip() + "\n-----\n")
    return texts


def train_model(model, train_loader, val_loader, config, *, run_dir=None, tokenizer=None, token_bytes=None,
                resume_state: dict | None = None, ctx: DistContext | None = None, log=print,
                sample_prompts: tuple[str, ...] = ("\n",), progress: bool = True):
    """Train `model` for `config.max_steps` optimizer steps; returns (model, metrics)."""
    ctx = ctx or DistContext()
    caps = config.capabilities()
    device = next(model.parameters()).device
    precision: Precision = choose_precision(config, caps)
    if run_dir is None and config.out_dir is None:
        from .run import default_run_dir

        config.out_dir = str(default_run_dir(config))
    run_dir = Path(run_dir or config.out_dir)
    logger = MetricsLogger(run_dir, enabled=ctx.is_main)
    core = _core(model)
    optimizers = setup_optimizers(core, config,
                                  log=log if ctx.is_main else (lambda *_: None),
                                  distributed=ctx.enabled)
    scheduler = get_lr_scheduler(optimizers, config)
    params = [p for p in model.parameters() if p.requires_grad]
    flops_per_token = core.flops_per_token(config.max_seq_len)
    peak = caps.peak_flops * (caps.device_count if caps.is_cuda else 1)

    sharded = is_sharded(model)
    step, best_val, skipped, consecutive_bad = 0, math.inf, 0, 0
    if resume_state is not None:
        check_optimizer_layout(optimizers, resume_state["optimizers"])
        if sharded:
            load_sharded_optimizer_states(core, optimizers, resume_state["optimizers"])
        else:
            for opt, sd in zip(optimizers, resume_state["optimizers"]):
                opt.load_state_dict(sd)
        scheduler.load_state_dict(resume_state["scheduler"])
        if precision.scaler is not None and resume_state.get("scaler"):
            precision.scaler.load_state_dict(resume_state["scaler"])
        train_loader.load_state_dict(resume_state["data"])
        set_rng_state(resume_state["rng"])
        step = resume_state["step"]
        best_val = resume_state.get("best_val", math.inf)
        skipped = resume_state.get("skipped_steps", 0)
        log(f"Resumed at step {step} (epoch {train_loader.epoch}, batch {train_loader.position})")

    def checkpoint(is_best=False):
        if sharded:  # FSDP2: gather full tensors (every rank takes part), rank 0 writes
            weights, optim_states = gathered_states(core, optimizers)
            if config.tie_embeddings:  # stored once, as safetensors' save_model does for tied weights
                weights.pop("lm_head.weight", None)
        else:
            weights, optim_states = core, [o.state_dict() for o in optimizers]
        state = {"optimizers": optim_states, "scheduler": scheduler.state_dict(),
                 "scaler": precision.scaler.state_dict() if precision.scaler else None,
                 "data": train_loader.state_dict(), "rng": rng_state(), "config": config.to_dict(),
                 "tokenizer": getattr(tokenizer, "identity", None), "best_val": best_val,
                 "skipped_steps": skipped, "world_size": ctx.world_size, "parallel": config.parallel}
        if ctx.is_main:
            return save_checkpoint(run_dir, step, weights, state, keep=config.keep_checkpoints, best=is_best)
        return None

    def evaluate():
        nonlocal best_val
        # forward-only passes run the plain model (a compiled one would recompile for eval mode);
        # under FSDP2 the plain model is the sharded one, so every rank still takes part
        result = evaluate_model(core, val_loader, config, token_bytes=token_bytes, precision=precision,
                                device=device, peak_flops=peak)
        for key in ("loss", "accuracy", "bits_per_byte"):  # every rank scored an equal share
            if key in result:
                result[key] = ctx.all_reduce_mean(result[key])
        result["perplexity"] = math.exp(min(result["loss"], 50.0))
        is_best = result["loss"] < best_val
        best_val = min(best_val, result["loss"])
        if tokenizer is not None and (ctx.is_main or sharded):  # sharded forwards need every rank
            _write_samples(model, tokenizer, sample_prompts, run_dir, step, config, write=ctx.is_main)
        if ctx.is_main:
            logger.log("eval", step, result)
            plot_run(logger.records, run_dir)
        return result, is_best

    log(f"Training {config.model_type} model: {core.parameter_report()['total']:,} params, "
        f"precision {precision.name}, fp8 {'on' if config.use_fp8 else 'off'}, {ctx.world_size} process(es), "
        f"{config.tokens_per_step * ctx.world_size:,} tokens per optimizer step")
    bar = None
    if progress and ctx.is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.max_steps, initial=step, desc="train", dynamic_ncols=True)
    last_eval: dict = {}
    stopped_by_signal = False
    model.train()
    tok_rate = None
    with StopRequest() as stop:
        while step < config.max_steps:
            t0 = time.perf_counter()
            loss_sum, lm_sum, finite = 0.0, 0.0, True
            for micro in range(config.grad_accum_steps):
                batch = train_loader.next_batch()
                x, y = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
                doc_ids = batch[2].to(device) if len(batch) > 2 else None
                last = micro == config.grad_accum_steps - 1
                with no_sync(model, active=ctx.enabled and not last):
                    with precision.autocast():
                        out = model(x, y, doc_ids=doc_ids)
                    loss = out.loss / config.grad_accum_steps
                    if precision.scaler is not None:
                        precision.scaler.scale(loss).backward()
                    else:
                        loss.backward()
                # one host sync per micro-step for both numbers
                micro_loss, micro_lm = torch.stack([loss.detach(), out.lm_loss.detach()]).tolist()
                loss_sum += micro_loss
                lm_sum += micro_lm / config.grad_accum_steps
                finite = finite and math.isfinite(micro_loss)
            if ctx.enabled:  # log the global mean, not rank 0's share
                loss_sum, lm_sum = ctx.all_reduce_mean(loss_sum), ctx.all_reduce_mean(lm_sum)
                finite = math.isfinite(loss_sum)  # one rank's NaN makes every rank skip together
            if precision.scaler is not None:
                for opt in optimizers:
                    precision.scaler.unscale_(opt)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, config.grad_clip if config.grad_clip > 0 else float("inf"))
            grad_norm = scalar(grad_norm)
            if finite and math.isfinite(grad_norm):
                for opt in optimizers:
                    if precision.scaler is not None:
                        precision.scaler.step(opt)
                    else:
                        opt.step()
                consecutive_bad = 0
            else:
                skipped += 1
                consecutive_bad += 1
                log(f"step {step}: non-finite {'loss' if not finite else 'gradient'} "
                    f"(loss {loss_sum}, grad norm {grad_norm}); step skipped ({skipped} so far)")
            if precision.scaler is not None:
                precision.scaler.update()
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            lr = optimizers[0].param_groups[0]["lr"]
            scheduler.step()
            step += 1

            dt = time.perf_counter() - t0
            tokens = config.tokens_per_step * ctx.world_size
            tok_rate = tokens / dt if tok_rate is None else 0.9 * tok_rate + 0.1 * tokens / dt
            record = {"loss": loss_sum, "lm_loss": lm_sum, "lr": lr, "grad_norm": grad_norm,
                      "tokens_per_sec": tokens / dt, "mfu": flops_per_token * tokens / dt / peak,
                      "step_time": dt}
            if out.expert_load:
                record["max_expert_load"] = max(float(l.max()) for l in out.expert_load)
            logger.log("train", step, record)
            if bar is not None:
                bar.set_postfix(loss=f"{lm_sum:.3f}", lr=f"{lr:.2e}", tok_s=f"{tok_rate:,.0f}", refresh=False)
                bar.update(1)

            if consecutive_bad >= config.max_nonfinite_steps:
                checkpoint()
                if bar is not None:
                    bar.close()
                logger.close()
                raise RunError(f"training stopped at step {step}: {consecutive_bad} consecutive steps had a "
                               f"non-finite loss or gradient. A checkpoint was saved in {run_dir}/checkpoints. "
                               "Lower --lr, keep --grad-clip on, or try --no-amp, then --resume-from latest")
            if step % config.eval_every == 0 or step == config.max_steps:
                last_eval, is_best = evaluate()
                if step % config.checkpoint_every == 0 or step == config.max_steps or is_best:
                    checkpoint(is_best=is_best)
            elif step % config.checkpoint_every == 0:
                checkpoint()
            if stop.requested:
                stopped_by_signal = True
                if step % config.checkpoint_every != 0 and step != config.max_steps:
                    checkpoint()
                break
    if bar is not None:
        bar.close()
    if stopped_by_signal:
        log(f"Stopped by signal at step {step}; checkpoint saved in {run_dir}/checkpoints.\n"
            f"Resume with: python train.py --resume-from {run_dir}")
    metrics = {"step": step, "skipped_steps": skipped, "stopped_by_signal": stopped_by_signal,
               "train_tokens_per_sec": tok_rate or 0.0, "best_val_loss": best_val, **last_eval}
    if ctx.is_main:
        if logger.records:
            plot_run(logger.records, run_dir)
        (run_dir / "summary.json").write_text(json.dumps(metrics, indent=2, default=str))
    logger.close()
    return model, metrics
