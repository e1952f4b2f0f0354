"""Training an ensemble (`--ensemble N`): N runs of one recipe with seeds --seed, --seed + 1, ..., written as
the members of one run directory (layout: ensemble_dir), then scored as one model, `EnsembleLM` (the mean of
their next-token distributions).

Side by side or one after another: on a CPU with at least N cores and outside torchrun, every member trains
in its own process (its own session, pinned to its share of the cores: a small model gains more from a core
of its own than from a second thread; docs/LOG.md); on a GPU or under torchrun the members train one after
another in this process (group). A stopped ensemble (Ctrl-C, SIGTERM) continues with `--resume-from RUN`:
finished members are kept, the others resume from their last checkpoints.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from ..configs import AdaptiveMoEModelConfig
from ..errors import BlueberryError, RunError, UsageError
from ..logs import get_logger, prefixed, quiet
from ..models.ensemble import EnsembleLM
from ..runs.checkpoint import POINTER, read_state, resolve_checkpoint
from ..runs.ensemble_dir import member_dir, refuse_to_resume_combined, write_ensemble_file
from ..runs.layout import (
    CHECKPOINTS,
    LAUNCH,
    TOKENIZER,
    check_new_run_dir,
    default_run_dir,
    prepare_run_dir,
    read_config,
    read_summary,
    write_config,
    write_summary,
)
from ..runs.loading import load_model
from .distributed import init_distributed, teardown
from .evaluation import evaluate_model
from .precision import choose_precision
from .test_split import score_test_split

log = get_logger(__name__).info

# A member process: pinned before anything reads the core count; on Linux it is sent SIGTERM (save and stop)
# if this process dies without passing on a signal (e.g. SIGKILL), so that no member outlives its ensemble.
_CHILD = ("import os, signal, sys\n"
          "if sys.platform.startswith('linux'):\n"
          "    import ctypes; ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG\n"
          "    if os.getppid() != int(sys.argv[4]): sys.exit(128 + signal.SIGTERM)\n"
          "os.sched_setaffinity(0, [int(c) for c in sys.argv[3].split(',')])\n"
          "from blueberry.training.ensemble import member_main\n"
          "sys.exit(member_main(sys.argv[1], sys.argv[2]))")


def run_ensemble(config, resuming: bool = False, task_scorer_factory=None) -> tuple[EnsembleLM | None, dict]:
    """Train (or finish) the members of `config`'s ensemble, then score them as one model. Returns (the
    ensemble, its metrics), or (None, the stopped member's metrics) when a signal stopped a member."""
    run_dir = Path(config.training.out_dir) if config.training.out_dir else default_run_dir(config)
    config.derive(out_dir=str(run_dir))
    if resuming:
        refuse_to_resume_combined(run_dir)
    if not resuming:
        check_new_run_dir(run_dir)  # an ensemble, a single run or foreign files: exit 2, nothing written
    start = time.perf_counter()
    if _side_by_side(config):
        prepare_run_dir(run_dir, resuming=True)
        _prepare_data(config)
        _announce(config, run_dir, "side by side, one process each")
        members = [member_config(config, i) for i in range(config.training.ensemble)]
        stopped = _train_side_by_side(members)
        if stopped is not None:
            return None, stopped
        return _score(config, members, init_distributed("cpu"), start, task_scorer_factory)
    from .run import device_type, train_in_group

    ctx = init_distributed(device_type(config))
    members = [member_config(config, i) for i in range(config.training.ensemble)]
    try:
        if ctx.is_main:
            prepare_run_dir(run_dir, resuming=True)
            _announce(config, run_dir, "one after another")
        for i, member in enumerate(members):
            if _finished(member):
                continue
            state, ckpt = _resume_point(member)
            log(f"\n=== ensemble member {i} of {len(members)} (seed {member.training.seed}) -> "
                f"{member.training.out_dir} ===")
            _, metrics = train_in_group(member, ctx, state, ckpt, task_scorer_factory)
            if metrics.get("stop_signal") is not None:
                return None, metrics
        ctx.barrier()  # every member's summary is written (by rank 0) before any rank reads it
        return _score(config, members, ctx, start, task_scorer_factory)
    finally:
        teardown(ctx)


def member_config(config, index: int) -> AdaptiveMoEModelConfig:
    """Member `index`'s run: the recipe with its own seed, evaluated once at its end (the tasks are scored on
    the ensemble, not on each member)."""
    t = config.training
    return config.replace(ensemble=1, seed=t.seed + index, out_dir=str(member_dir(Path(t.out_dir), index)),
                          eval_every=t.max_steps, eval_tasks="none")


def _side_by_side(config) -> bool:
    caps = config.capabilities()
    on_cpu = (config.training.device or ("cuda" if caps.is_cuda else "cpu")).startswith("cpu")
    return on_cpu and int(os.environ.get("WORLD_SIZE", "1")) <= 1 and caps.cpu_cores >= config.training.ensemble


def _announce(config, run_dir: Path, how: str) -> None:
    write_ensemble_file(run_dir, config.training.ensemble)
    write_config(run_dir, config)
    t = config.training
    log(f"Ensemble of {t.ensemble} runs (seeds {t.seed}..{t.seed + t.ensemble - 1}), {how}: {run_dir}")


def _prepare_data(config) -> None:
    """Build the data cache (and tokenizer) once, before the members read it side by side."""
    from .run import build_data

    build_data(config)


def _finished(member) -> bool:
    summary = read_summary(member.training.out_dir)
    if not summary:
        return False
    return summary.get("step") == member.training.max_steps and not summary.get("stopped_by_signal")


def _resume_point(member):
    """(checkpoint state, checkpoint) to continue `member` from, or (None, None) to start it."""
    if not (Path(member.training.out_dir) / CHECKPOINTS / POINTER).exists():
        return None, None
    ckpt = resolve_checkpoint(member.training.out_dir)
    return read_state(ckpt), ckpt


# ---- side by side: one process per member ----
def _core_groups(count: int) -> list[list[int]]:
    cores = sorted(os.sched_getaffinity(0))
    per = len(cores) // count
    return [cores[i * per:(i + 1) * per] for i in range(count)]


def _train_side_by_side(members) -> dict | None:
    """Train the unfinished members at once, each in its own process group; None when all finished, else the
    metrics of a member a signal stopped. A signal to this process is passed on to every member once."""
    package_root = Path(__file__).resolve().parents[2]  # the directory that holds blueberry/
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(package_root),
                                                        os.environ.get("PYTHONPATH", "")])}
    procs = {}
    for i, (member, cores) in enumerate(zip(members, _core_groups(len(members)))):
        if _finished(member):
            continue
        Path(member.training.out_dir).mkdir(parents=True, exist_ok=True)
        write_config(member.training.out_dir, member, LAUNCH)
        env_i = {**env, "OMP_NUM_THREADS": str(len(cores)), "BLUEBERRY_PROGRESS": "1" if not procs else "0"}
        procs[i] = subprocess.Popen([sys.executable, "-c", _CHILD, member.training.out_dir, str(i),
                                     ",".join(map(str, cores)), str(os.getpid())],
                                    env=env_i, start_new_session=True)
        log(f"member {i} (seed {member.training.seed}, cores {cores}): pid {procs[i].pid}, log in "
            f"{member.training.out_dir}")

    def forward(signum, _frame):
        for p in procs.values():
            if p.poll() is None:
                os.killpg(p.pid, signum)
    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        codes = {i: p.wait() for i, p in procs.items()}  # a signal runs `forward`; wait() resumes (PEP 475)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for p in procs.values():  # an exception here (or in a member) leaves no member running
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    failed = {i: c for i, c in codes.items() if c not in (0, 128 + signal.SIGINT, 128 + signal.SIGTERM)}
    if failed:
        i, code = next(iter(failed.items()))
        raise RunError(f"ensemble member {i} failed (exit code {code}); its messages are above and its run in "
                            f"{members[i].training.out_dir}")
    stopped = [i for i, c in codes.items() if c]
    if not stopped:
        return None
    summary = read_summary(members[stopped[0]].training.out_dir)  # {} when stopped before its first step
    return summary or {"stopped_by_signal": True, "stop_signal": codes[stopped[0]] - 128}


def member_main(out_dir: str, index: str) -> int:
    """The process of one side-by-side member: train (or resume) the run described by OUT_DIR/launch.json."""
    from .run import run_training

    config = read_config(out_dir, LAUNCH)
    state, ckpt = _resume_point(config)

    prefixed(f"[member {index}] ")
    try:
        _, metrics = run_training(config, resume_state=state, resume_checkpoint=ckpt,  # no tasks: see
                                  progress=os.environ.get("BLUEBERRY_PROGRESS") == "1")  # member_config
    except BlueberryError as exc:
        print(f"error: [member {index}] {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    except KeyboardInterrupt:  # a signal before the trainer took over the signals: nothing to save yet
        return 128 + signal.SIGINT
    except Exception as exc:  # unexpected: one line, as the command line does
        print(f"error: [member {index}] unexpected {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return 1
    signum = metrics.get("stop_signal")
    return 128 + int(signum) if signum else 0  # as the command line's exit code


# ---- the ensemble as one model ----
def _score(config, members, ctx, start: float, task_scorer_factory) -> tuple[EnsembleLM, dict]:
    """Validation (and test-split) figures of the members' mixture, on the windows each member was scored on."""
    from .run import resolve_device

    device = resolve_device(config)
    if ctx.enabled and device.type == "cuda":
        device = torch.device("cuda", ctx.local_rank)
    models = [load_model(m.training.out_dir, str(device))[0] for m in members]
    ensemble, tokenizer, result, _ = score_mixture(config, models, ctx)
    summaries = [read_summary(m.training.out_dir) for m in members]
    metrics = {**result, "ensemble": len(members),
               "step": config.training.max_steps, "elapsed": time.perf_counter() - start,
               "stopped_by_signal": False, "stop_signal": None,
               "members": [{"run_dir": m.training.out_dir, "seed": m.training.seed,
                            **{k: s.get(k) for k in ("bits_per_byte", "test_bits_per_byte", "loss", "elapsed",
                                                     "train_tokens_per_sec")}} for m, s in zip(members, summaries)]}
    run_dir = Path(config.training.out_dir)
    if ctx.is_main:
        scorer = task_scorer_factory(config, tokenizer) if task_scorer_factory else None
        if scorer is not None:
            metrics.update(scorer(ensemble))
        tokenizer.save(run_dir / TOKENIZER)
        write_summary(run_dir, metrics)
        _print_summary(metrics, run_dir)
    if config.data.test_fraction > 0:
        score_test_split(ensemble, config, tokenizer, ctx, run_dir, metrics)
    return ensemble, metrics


def score_mixture(config, models, ctx, each: bool = False,
                  expected_tokenizer: str | None = None) -> tuple[EnsembleLM, object, dict, list[dict]]:
    """`models` as one `EnsembleLM`, scored on `config`'s validation windows (every rank its share), as an
    ensemble is at its end: (the ensemble, the data's tokenizer, the mixture's figures, and with `each` every
    model's own figures on the same windows). Also `blueberry ensemble` (combine_runs), which gives the
    members' tokenizer (`expected_tokenizer`, a content id): data read with another is refused before scoring."""
    from .run import build_data

    ensemble = EnsembleLM(models).eval()
    with quiet():  # the data the members were trained on, announced then
        tokenizer, corpus, _, val_loader = build_data(config, ctx.rank, ctx.world_size)
    if expected_tokenizer is not None and tokenizer.content_id != expected_tokenizer:
        raise UsageError(f"the data of the first run ({config.data.dataset}, cache {config.data.cache_dir}) is now "
                         "read with another tokenizer than the run's; restore its data cache (nothing was written "
                         "to --out)")
    precision = choose_precision(config, config.capabilities())

    def score(model) -> dict:
        result = evaluate_model(model, val_loader, config, token_bytes=corpus.token_bytes, precision=precision,
                                ranks=ctx)
        return {k: v for k, v in result.items() if k != "expert_load"}
    return ensemble, tokenizer, score(ensemble), [score(m) for m in models] if each else []


def _print_summary(metrics: dict, run_dir: Path) -> None:
    log("")
    log(f"Ensemble run directory: {run_dir} ({metrics['ensemble']} members, {metrics['elapsed'] / 60:.1f} min)")
    for i, m in enumerate(metrics["members"]):
        log(f"  member {i} (seed {m['seed']})  bits per byte {m['bits_per_byte']:.4f}")
    log(f"  ensemble       val loss {metrics['loss']:.4f}, perplexity {metrics['perplexity']:.2f}, "
        f"accuracy {metrics['accuracy']:.4f}")
    log(f"  ensemble       bits per byte {metrics['bits_per_byte']:.4f}")
    for key in sorted(k for k in metrics if k.endswith("/acc")):
        task = key[:-4]
        log(f"  {task:<28} acc {metrics[key]:.4f}, acc_norm {metrics[task + '/acc_norm']:.4f}")
