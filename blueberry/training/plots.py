"""PNG plots of a run: train/val loss, learning rate, tokens/s, and expert load for MoE models."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _series(records, kind, key):
    pts = [(r["step"], r[key]) for r in records if r.get("kind") == kind and r.get(key) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_run(records: list[dict], out_dir: str | Path) -> list[Path]:
    out_dir = Path(out_dir)
    written = []
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    steps, loss = _series(records, "train", "lm_loss")
    axes[0].plot(steps, loss, label="train", alpha=0.7)
    vsteps, vloss = _series(records, "eval", "loss")
    axes[0].plot(vsteps, vloss, "o-", label="val")
    axes[0].set(xlabel="optimizer step", ylabel="cross-entropy (nats)", title="loss")
    axes[0].legend()
    axes[1].plot(*_series(records, "train", "lr"))
    axes[1].set(xlabel="optimizer step", ylabel="lr (first group)", title="learning rate")
    axes[2].plot(*_series(records, "train", "tokens_per_sec"))
    axes[2].set(xlabel="optimizer step", ylabel="tokens/s", title="throughput")
    fig.tight_layout()
    path = out_dir / "loss_curve.png"
    fig.savefig(path, dpi=80)
    plt.close(fig)
    written.append(path)

    evals = [r for r in records if r.get("kind") == "eval" and r.get("expert_load")]
    if evals:
        load = evals[-1]["expert_load"]  # layers x experts
        fig, ax = plt.subplots(figsize=(max(4, len(load[0]) * 0.6), max(3, len(load) * 0.5)))
        im = ax.imshow(load, aspect="auto", cmap="viridis")
        ax.set(xlabel="expert", ylabel="layer", title=f"expert load at step {evals[-1]['step']}")
        fig.colorbar(im, ax=ax, label="fraction of assignments")
        fig.tight_layout()
        path = out_dir / "expert_load.png"
        fig.savefig(path, dpi=80)
        plt.close(fig)
        written.append(path)
    return written


def plot_sweep(results: list[dict], curves: dict, path: str | Path) -> Path:
    """Val-loss curves of an LR sweep, best run marked."""
    fig, ax = plt.subplots(figsize=(7, 4))
    best = min(results, key=lambda r: r["val_loss"])
    for r in results:
        steps, losses = curves[r["lr"]]
        style = "-" if r is best else "--"
        ax.plot(steps, losses, style, marker="o", label=f"lr={r['lr']:g}" + (" (best)" if r is best else ""))
    ax.set(xlabel="optimizer step", ylabel="val loss", title="learning-rate sweep")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return Path(path)
