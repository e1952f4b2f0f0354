"""MLflow: one MLflow run per training run, through MlflowClient: the scalars as metrics, the config as
parameters, the summary as the artifact summary.json. The default store is a file store under the run
(MLflow 3 keeps file stores in maintenance mode: MLFLOW_ALLOW_FILE_STORE is set for a file: URI); a
database or server URI is used as given."""

from __future__ import annotations

import os
import time

from ...runs.layout import SUMMARY
from . import Tracker, flat_config

_MAX_PARAM = 6000  # MLflow's limit on a parameter value's length


class MlflowTracker(Tracker):
    def __init__(self, run_dir, run_name: str):
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI") or (run_dir / "mlruns").resolve().as_uri()
        if uri.startswith("file:"):  # MLflow 3 keeps its file store in maintenance mode behind this opt-in
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "blueberry")
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
        self.run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id

    def log_config(self, config: dict) -> None:
        from mlflow.entities import Param

        params = [Param(k, str(v)[:_MAX_PARAM]) for k, v in flat_config(config).items()]
        for start in range(0, len(params), 100):  # MLflow takes at most 100 parameters per batch
            self.client.log_batch(self.run_id, params=params[start:start + 100])

    def log_scalars(self, step: int, scalars: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in scalars.items()])

    def log_summary(self, summary: dict) -> None:
        self.client.log_dict(self.run_id, summary, SUMMARY)  # as in the run directory

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def create(run_dir, run_name: str) -> MlflowTracker:
    return MlflowTracker(run_dir, run_name)
