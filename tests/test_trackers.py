"""Experiment trackers: one 5-step tiny run logging to TensorBoard, W&B (offline), MLflow (file store) and
Trackio (local; only where it is installed: it is not in the test extra) at once; each tracker's own files,
read back with its own library, must hold the scalars of metrics.jsonl, the run's config and the final
summary."""

from __future__ import annotations

import importlib.util
import json
import struct
import sys

import pytest

from helpers import TINY_FLAGS, run_cli


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory, corpus_dir):
    root = tmp_path_factory.mktemp("tracked")
    trackers = ["tensorboard"] + [name for name in ("wandb", "mlflow", "trackio") if importlib.util.find_spec(name)]
    env = dict(WANDB_MODE="offline", WANDB_DIR=str(root / "wandb"), WANDB_SILENT="true",
               MLFLOW_TRACKING_URI=(root / "mlruns").as_uri(), TRACKIO_DIR=str(root / "trackio"))
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        r = run_cli("--dataset", corpus_dir, "--cache-dir", root / "cache", "--out-dir", root / "run", "--max-steps",
                    "5", "--eval-every", "5", "--no-compile", "--tracker", ",".join(trackers),
                    *TINY_FLAGS)
    assert r.returncode == 0, r.stderr
    from blueberry.runs.layout import read_metrics

    records = read_metrics(root / "run")
    train = {r["step"]: r["loss"] for r in records if r["kind"] == "train"}
    assert sorted(train) == [1, 2, 3, 4, 5]
    summary = json.loads((root / "run" / "summary.json").read_text())
    return root, train, summary, trackers


def read_wandb_records(path):
    """The Record protobufs of a wandb transaction log (.wandb): a 7-byte header, then LevelDB-log style
    blocks of 32 KiB holding chunks (crc32, length, type: full/first/middle/last) of each record."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, pending, out = 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # too little room left in the block for a chunk header: padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            break
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # full or last: a record is complete
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            out.append(record)
            pending = b""
    return out


def test_wandb_offline_run_holds_scalars_config_and_summary(tracked_run):
    pytest.importorskip("wandb")
    root, train, summary, trackers = tracked_run
    (log,) = (root / "wandb").rglob("offline-run-*/run-*.wandb")
    records = read_wandb_records(log)
    history = {}
    for rec in records:
        if rec.WhichOneof("record_type") == "history":
            items = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item}
            if "train/loss" in items:
                history[int(items["_step"])] = items["train/loss"]
    assert history == pytest.approx(train)
    config = {i.key: json.loads(i.value_json) for rec in records if rec.WhichOneof("record_type") == "config"
              for i in rec.config.update}
    assert config["d_model"] == 32 and config["tracker"] == ",".join(trackers)
    final = {i.key: json.loads(i.value_json) for rec in records if rec.WhichOneof("record_type") == "summary"
             for i in rec.summary.update}
    assert final["best_val_loss"] == pytest.approx(summary["best_val_loss"])


def test_mlflow_file_store_holds_scalars_config_and_summary(tracked_run, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    root, train, summary, trackers = tracked_run
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=(root / "mlruns").as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("blueberry").experiment_id])
    assert run.info.run_name == "run" and run.info.status == "FINISHED"
    losses = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train/loss")}
    assert losses == pytest.approx(train)
    assert run.data.params["d_model"] == "32" and run.data.params["max_steps"] == "5"
    saved = client.download_artifacts(run.info.run_id, "summary.json", str(root / "dl"))
    assert json.loads(open(saved).read())["best_val_loss"] == pytest.approx(summary["best_val_loss"])


def test_trackio_local_project_holds_scalars_config_and_summary(tracked_run, monkeypatch):
    import subprocess

    pytest.importorskip("trackio")
    root, train, summary, trackers = tracked_run
    script = ("import json, trackio\nfrom trackio.sqlite_storage import SQLiteStorage\n"
              "run = trackio.Api().runs('blueberry')[0]\n"
              "print(json.dumps({'name': run.name, 'config': run.config, "
              "'logs': SQLiteStorage.get_logs('blueberry', run.name)}, default=str))")
    # trackio reads TRACKIO_DIR when imported: a fresh interpreter
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         env={**__import__("os").environ, "TRACKIO_DIR": str(root / "trackio")})
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["name"] == "run" and got["config"]["d_model"] == 32
    losses = {log["step"]: log["train/loss"] for log in got["logs"] if "train/loss" in log}
    assert losses == pytest.approx(train)
    final = [log for log in got["logs"] if "summary/best_val_loss" in log]
    assert final and final[-1]["summary/best_val_loss"] == pytest.approx(summary["best_val_loss"])


def test_tensorboard_events_hold_the_same_scalars(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root, train, _, _ = tracked_run
    events = EventAccumulator(str(root / "run" / "tensorboard"))
    events.Reload()
    assert {e.step: e.value for e in events.Scalars("train/loss")} == pytest.approx(train)


def test_a_missing_tracker_library_is_a_usage_error(tmp_path, monkeypatch):
    from blueberry.errors import UsageError
    from blueberry.training.metrics import MetricsLogger

    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb now fails as if not installed
    with pytest.raises(UsageError, match=r"wandb package.*pip install 'blueberry\[trackers\]'"):
        MetricsLogger(tmp_path, trackers=["wandb"])


def test_an_unknown_tracker_exits_2(tmp_path, corpus_dir):
    r = run_cli("--dataset", corpus_dir, "--out-dir", tmp_path / "run", "--max-steps", "1", "--tracker",
                "tensorboard,neptune", *TINY_FLAGS)
    assert r.returncode == 2 and "tracker" in r.stderr and "neptune" in r.stderr and "Traceback" not in r.stderr
