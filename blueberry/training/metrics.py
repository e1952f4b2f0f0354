"""Run logs: one JSON object per line in metrics.jsonl, the same scalars in the experiment trackers
(TensorBoard event files by default; `--tracker`, trackers/).

Only the main process writes (the others get a logger with `enabled=False`, which creates no tracker).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..runs.layout import metrics_path


class MetricsLogger:
    def __init__(self, run_dir: str | Path, enabled: bool = True, tensorboard: bool = True,
                 trackers: list[str] | None = None):
        """`trackers`: names from trackers.TRACKERS (default: TensorBoard, unless `tensorboard=False`)."""
        from .trackers import create_tracker

        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.records: list[dict] = []
        self.trackers = []
        if enabled:
            names = (["tensorboard"] if tensorboard else []) if trackers is None else trackers
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.trackers = [create_tracker(name, self.run_dir, self.run_dir.name) for name in names]
            self._file = open(metrics_path(self.run_dir), "a", encoding="utf-8")

    def log_config(self, config: dict) -> None:
        for tracker in self.trackers:
            tracker.log_config(config)

    def log_summary(self, summary: dict) -> None:
        for tracker in self.trackers:
            tracker.log_summary(summary)

    def log(self, kind: str, step: int, values: dict) -> None:
        record = {"kind": kind, "step": step, **values}
        self.records.append(record)
        if not self.enabled:
            return
        self._file.write(json.dumps(record, default=_jsonable) + "\n")
        self._file.flush()
        if self.trackers:
            from .trackers import scalars_of

            scalars = scalars_of(kind, values)
            for tracker in self.trackers:
                tracker.log_scalars(step, scalars)

    def close(self) -> None:
        if self.enabled:
            self._file.close()
            for tracker in self.trackers:
                tracker.close()
            self.trackers = []


def _jsonable(x):
    if hasattr(x, "tolist"):
        return x.tolist()
    return str(x)
