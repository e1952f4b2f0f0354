"""Trackio: one run in a local Trackio project (TRACKIO_DIR); it has no summary of its own, so the final
summary is logged as `summary/<name>` scalars at the last step."""

from __future__ import annotations

import os

from . import Tracker, scalars_of


class TrackioTracker(Tracker):
    def __init__(self, run_dir, run_name: str):
        import trackio

        self.trackio, self.name, self.run = trackio, run_name, None
        self.project = os.environ.get("TRACKIO_PROJECT", "blueberry")

    def log_config(self, config: dict) -> None:
        # the run starts here: trackio takes its config at init only
        self.run = self.trackio.init(project=self.project, name=self.name, config=config, embed=False,
                                     auto_log_gpu=False, auto_log_cpu=False)

    def _started(self):
        if self.run is None:
            self.log_config({})
        return self.run

    def log_scalars(self, step: int, scalars: dict[str, float]) -> None:
        self._started().log(scalars, step=step)

    def log_summary(self, summary: dict) -> None:
        self._started().log(scalars_of("summary", summary), step=int(summary.get("step") or 0))

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()


def create(run_dir, run_name: str) -> TrackioTracker:
    import trackio  # noqa: F401  (fail now, not at the first log, when it is missing)

    return TrackioTracker(run_dir, run_name)
