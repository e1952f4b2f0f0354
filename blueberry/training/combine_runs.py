"""`blueberry ensemble RUN RUN ... --out DIR`: finished runs of one tokenizer combined after the fact into one
ensemble directory (layout: ensemble_dir) that generate, chat, eval, serve, quantize and compare read as they
read an `--ensemble N` run: the mean of the members' next-token distributions (`EnsembleLM`).

The members are not copied: DIR/ensemble.json names them by absolute path ("combined": true; move a member
and DIR stops loading, naming it). DIR/config.json is the first member's config with ensemble=N, and
DIR/tokenizer.json (or hf_tokenizer/) its tokenizer. The mixture and each member are scored on the first
member's validation windows (and test split, when it has one) by the function that scores an `--ensemble`
run at its end (`ensemble.score_mixture`): DIR/summary.json holds those figures and each member's own.

Refused in one line (exit 2, nothing written): fewer than two runs, a run given twice, a path that is not a
finished single run (missing, unfinished or stopped, an ensemble, a quantized copy), runs of different
tokenizers, vocabularies or windows, and a DIR that is not empty or lies inside a member. DIR is built under
a temporary name beside it and renamed when complete (atomic.building_dir).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from ..atomic import building_dir
from ..configs import AdaptiveMoEModelConfig
from ..errors import BlueberryError, UsageError
from ..logs import get_logger, quiet
from ..runs.checkpoint import read_state, resolve_checkpoint, run_dir_of
from ..runs.ensemble_dir import ENSEMBLE_FILE, is_ensemble, write_ensemble_file
from ..runs.layout import copy_tokenizer, read_summary, write_config, write_summary
from ..runs.loading import load_model, run_tokenizer
from .distributed import DistContext
from .ensemble import score_mixture
from .test_split import score_test_split

log = get_logger(__name__).info


@dataclass
class Member:
    run_dir: Path  # absolute
    checkpoint: Path
    config: AdaptiveMoEModelConfig
    summary: dict
    tokenizer: object


def combine_runs(runs: list[str], out: str | Path, device: str | None = None) -> dict:
    """Write OUT as the ensemble of the finished `runs`; returns its summary (also OUT/summary.json)."""
    from .run import resolve_device

    if len(runs) < 2:
        raise UsageError(f"blueberry ensemble combines at least two runs, got {len(runs)}")
    members = [check_member(run) for run in runs]
    check_compatible(members)
    out = Path(out)
    check_out(out, members)
    scoring = members[0].config if device is None else members[0].config.replace(device=device)
    dev = resolve_device(scoring)
    models = [load_model(m.checkpoint, str(dev))[0] for m in members]
    start = time.perf_counter()
    ensemble, tokenizer, mixture, each = score_mixture(scoring, models, DistContext(), each=True,
                                                       expected_tokenizer=members[0].tokenizer.content_id)
    metrics = _summary(members, mixture, each, time.perf_counter() - start)
    with building_dir(out, "--out directory") as tmp:
        _write(tmp, out, members, metrics)
        if scoring.data.test_fraction > 0:  # rewrites summary.json with test_bits_per_byte
            with quiet():  # the table below shows it
                score_test_split(ensemble, scoring, tokenizer, DistContext(), tmp, metrics)
    _print_table(out, members, metrics, scoring)
    return metrics


def check_member(run: str | Path) -> Member:
    """A finished single run (its final checkpoint, summary and tokenizer), or a one-line refusal."""
    run_dir = Path(run)
    if not run_dir.is_dir():
        raise UsageError(f"{run}: no such run directory")
    if is_ensemble(run_dir):
        raise UsageError(f"{run} is itself an ensemble; give its member runs instead ({run_dir / ENSEMBLE_FILE} "
                         "lists them)")
    try:
        ckpt = resolve_checkpoint(run_dir)
        state = read_state(ckpt)
        tokenizer = run_tokenizer(run_dir_of(ckpt))
    except BlueberryError as exc:
        raise UsageError(f"{run} is not a finished Blueberry run ({exc})") from None
    if run_dir_of(ckpt).resolve() != run_dir.resolve():
        raise UsageError(f"{run} is a checkpoint; give its run directory {run_dir_of(ckpt)}")
    method = (state.get("quantization") or {}).get("method")
    if method:
        raise UsageError(f"{run} is a quantized ({method}) copy; combine the runs it was made from")
    config = AdaptiveMoEModelConfig.from_dict(state["config"])
    try:
        summary = read_summary(run_dir)
    except (OSError, ValueError):
        summary = None
    ended = isinstance(summary, dict) and (summary.get("step") == config.training.max_steps
                                           or summary.get("stopped_by_budget"))
    if not ended or summary.get("stopped_by_signal"):
        step = summary.get("step") if isinstance(summary, dict) else None
        raise UsageError(f"{run} is not a finished run (step {step} of {config.training.max_steps}); finish it with "
                         f"--resume-from {run} first")
    return Member(run_dir.resolve(), ckpt, config, summary, tokenizer)


def check_compatible(members: list[Member]) -> None:
    """One tokenizer (by content), one vocabulary size and one window; no run twice."""
    first = members[0]
    seen = set()
    for m in members:
        if m.run_dir in seen:
            raise UsageError(f"{m.run_dir} is given twice; give each run once")
        seen.add(m.run_dir)
        if m.tokenizer.content_id != first.tokenizer.content_id:
            raise UsageError(f"{m.run_dir} has another tokenizer than {first.run_dir}: the distributions of "
                             "runs of different tokenizers cannot be averaged")
        for field, what in (("vocab_size", "a vocabulary of"), ("max_seq_len", "a window of")):
            mine, theirs = getattr(m.config, field), getattr(first.config, field)
            if mine != theirs:
                raise UsageError(f"{m.run_dir} has {what} {mine} tokens, {first.run_dir} {theirs}: an "
                                 "ensemble's members must share it")


def check_out(out: Path, members: list[Member]) -> None:
    """OUT must be new or empty, and outside every member (nothing is written beside a run's files)."""
    target = out.resolve()
    for m in members:
        if target == m.run_dir or m.run_dir in target.parents:
            raise UsageError(f"--out {out} lies inside the run {m.run_dir}; choose a directory outside the runs")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        held = "an ensemble" if is_ensemble(out) else "files"
        raise UsageError(f"--out {out} already holds {held}; choose a new or empty directory (nothing was "
                         "overwritten)")


def _summary(members: list[Member], mixture: dict, each: list[dict], seconds: float) -> dict:
    """The ensemble's figures, then each member's on the same windows and from its own summary."""
    keep = ("bits_per_byte", "loss", "perplexity", "accuracy", "tokens")
    rows = [{"run_dir": str(m.run_dir), "seed": m.config.training.seed, **{k: r.get(k) for k in keep},
             "own_bits_per_byte": m.summary.get("bits_per_byte"),
             **{k: m.summary.get(k) for k in ("test_bits_per_byte", "step", "elapsed", "train_tokens_per_sec")}}
            for m, r in zip(members, each)]
    elapsed = sum(m.summary.get("elapsed") or 0.0 for m in members)
    return {**mixture, "ensemble": len(members), "combined": True, "scored_on": str(members[0].run_dir),
            "elapsed": elapsed, "scoring_seconds": seconds, "stopped_by_signal": False, "stop_signal": None,
            "members": rows}


def _write(tmp: Path, out: Path, members: list[Member], metrics: dict) -> None:
    """OUT's files, into `tmp` (renamed to OUT when complete)."""
    first = members[0]
    write_ensemble_file(tmp, [m.run_dir for m in members], combined=True)
    write_config(tmp, first.config.replace(ensemble=len(members), out_dir=str(out.resolve())))
    copy_tokenizer(first.run_dir, tmp)
    write_summary(tmp, metrics)


def _print_table(out: Path, members: list[Member], metrics: dict, config) -> None:
    log(f"Ensemble of {len(members)} runs -> {out}, scored on the validation split of {config.data.dataset} "
        f"({metrics['tokens']:,} tokens):")
    log(f"  {'run':<48} {'bits per byte':>13} {'val loss':>9}")
    for m, row in zip(members, metrics["members"]):
        name = f"{m.run_dir} (seed {m.config.training.seed})"
        log(f"  {name[-48:]:<48} {row['bits_per_byte']:>13.4f} {row['loss']:>9.4f}")
    log(f"  {'mixture':<48} {metrics['bits_per_byte']:>13.4f} {metrics['loss']:>9.4f}")
    if "test_bits_per_byte" in metrics:
        log(f"  {'mixture, test split':<48} {metrics['test_bits_per_byte']:>13.4f} {metrics['test_loss']:>9.4f}")
    log(f"Use it as one model: blueberry eval --checkpoint {out} (generate, chat and serve alike)")
