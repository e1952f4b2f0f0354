"""`blueberry compare RUN [RUN ...]`: the runs of an ablation side by side — one table (final val loss,
bits per byte, task scores, tokens/s, parameters active/total, wall time) and one PNG of the validation
curves against steps, tokens and wall time. It reads what each run wrote (metrics.jsonl, summary.json,
config.json); nothing is recomputed but the parameter counts (from the config, on the meta device). An
ensemble run is one row: its summary's figures, its members' parameters together, member 0's curves."""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from ..atomic import atomic_write_bytes  # noqa: E402
from ..errors import UsageError  # noqa: E402
from ..models import create_model  # noqa: E402
from ..runs.ensemble_dir import ensemble_members, is_ensemble  # noqa: E402
from ..runs.layout import CONFIG, METRICS, read_config, read_metrics, read_summary  # noqa: E402


def load_run(path: str | Path) -> dict:
    run = Path(path)
    if is_ensemble(run):
        return _load_ensemble_run(run)
    if not (run / METRICS).exists() or not (run / CONFIG).exists():
        raise UsageError(f"{run} is not a run directory (it needs {METRICS} and {CONFIG})")
    records = read_metrics(run)
    config = read_config(run)
    with torch.device("meta"):
        report = create_model(config).parameter_report()
    summary = read_summary(run)
    evals = [r for r in records if r["kind"] == "eval"]
    train = [r for r in records if r["kind"] == "train"]
    return {"name": run.name, "path": run, "config": config, "params": report, "summary": summary,
            "evals": evals, "train": train, "last_eval": evals[-1] if evals else {}}


def _load_ensemble_run(run: Path) -> dict:
    members = [load_run(m) for m in ensemble_members(run)]
    summary = read_summary(run)
    final = {k: v for k, v in summary.items() if k in ("loss", "bits_per_byte") or "/acc" in k}
    params = {k: sum(m["params"][k] for m in members) for k in members[0]["params"]}
    return {**members[0], "name": f"{run.name} (ensemble of {len(members)})", "path": run, "params": params,
            "summary": {**summary, "train_tokens_per_sec": sum(m["summary"].get("train_tokens_per_sec", 0)
                                                               for m in members)},
            "last_eval": final or members[0]["last_eval"], "wall": summary.get("elapsed")}


def comparison_table(runs: list[dict]) -> str:
    tasks = sorted({k[:-4] for r in runs for k in r["last_eval"] if k.endswith("/acc")})
    header = ["run", "model", "optimizer", "val loss", "bits/byte", *[f"{t} acc_norm" for t in tasks],
              "train tokens/s", "params active / total", "wall"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in runs:
        e, cfg = r["last_eval"], r["config"]
        tokens_s = r["summary"].get("train_tokens_per_sec")
        wall = r.get("wall") or (r["train"][-1].get("elapsed") if r["train"] else None)
        cells = [r["name"], cfg.model.architecture, cfg.optim.optimizer, _f(e.get("loss")), _f(e.get("bits_per_byte")),
                 *[_f(e.get(f"{t}/acc_norm")) for t in tasks], f"{tokens_s:,.0f}" if tokens_s else "n/a",
                 f"{r['params']['active_per_token'] / 1e6:.2f}M / {r['params']['total'] / 1e6:.2f}M",
                 f"{wall:.0f} s" if wall else "n/a"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _f(value) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else "n/a"


def check_plot_target(path: str | Path) -> Path:
    """Refuse (exit 2) an --out that exists and is not a plot `compare` wrote."""
    path = Path(path)
    if path.exists() and not is_our_plot(path):
        raise UsageError(f"--out {path} exists and was not written by blueberry compare; choose another --out "
                         "(nothing was overwritten)")
    return path


def plot_curves(runs: list[dict], path: str | Path) -> Path:
    path = check_plot_target(path)
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for r in runs:
        steps = [e["step"] for e in r["evals"]]
        losses = [e["loss"] for e in r["evals"]]
        by_step = {t["step"]: t for t in r["train"]}
        tokens = [by_step.get(s, {}).get("tokens", float("nan")) for s in steps]
        wall = [by_step.get(s, {}).get("elapsed", float("nan")) for s in steps]
        for ax, x in zip(axes, (steps, tokens, wall)):
            ax.plot(x, losses, "o-", label=r["name"])
    for ax, label in zip(axes, ("optimizer step", "training tokens", "wall seconds")):
        ax.set(xlabel=label, ylabel="validation loss (nats)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=80, format="png", metadata={"Software": PLOT_SOFTWARE})
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())  # a kill leaves the old plot or the new one
    return path


PLOT_SOFTWARE = "blueberry compare"


def is_our_plot(path: Path) -> bool:
    """A PNG whose Software text chunk says `blueberry compare` wrote it."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return False
    return head.startswith(b"\x89PNG") and b"tEXtSoftware\x00" + PLOT_SOFTWARE.encode() in head
