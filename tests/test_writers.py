"""Nothing lost, for every writer: each command that writes (train, ensemble, prepare, merge, export, import,
quantize, eval, compare) refuses to write over what it did not create (exit 2, one line, the foreign content
byte for byte intact), removes only what it provably wrote, and a kill -9 at a random moment leaves the old
state or the complete new one, never a mix. Also the README's multi-machine prepare, run as written."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import ROOT, TINY_FLAGS, cli_env, run_cli

FAST = [*TINY_FLAGS, "--no-compile"]


def snapshot(root: Path) -> dict:
    """Every file under `root` (relative path -> sha256), and every directory (-> None)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None
            for p in sorted(root.rglob("*"))}


def refused(r: subprocess.CompletedProcess, says: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    err = r.stderr.strip()
    assert says in err and "Traceback" not in err and len(err.splitlines()) == 1, err


def train(corpus: Path, root: Path, out: Path, *extra) -> subprocess.CompletedProcess:
    return run_cli("--dataset", corpus, "--cache-dir", root / "cache", "--out-dir", out, *FAST, *extra)


@pytest.fixture(scope="module")
def single_run(corpus_dir, tmp_path_factory) -> Path:
    """A finished tiny run (10 steps); tests that write into it work on a copy."""
    root = tmp_path_factory.mktemp("single")
    r = train(corpus_dir, root, root / "run", "--max-steps", "10")
    assert r.returncode == 0, r.stderr
    return root / "run"


def copy_of(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / run.name))


def foreign_dir(path: Path) -> dict:
    """A directory of the user's own files, named like ours; its snapshot."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "notes.txt").write_text("my notes\n")
    (path / "tokenizer.json").write_text("{\"mine\": true}\n")
    (path / "config.json").write_text("{\"mine\": true}\n")
    return snapshot(path)


# ---- item 3: --ensemble N over an existing run ----
def test_ensemble_over_a_finished_single_run_is_refused_and_changes_nothing(single_run, corpus_dir, tmp_path):
    before = snapshot(single_run)
    r = train(corpus_dir, tmp_path, single_run, "--max-steps", "10", "--ensemble", "2")
    refused(r, "already holds a run with checkpoints")
    assert snapshot(single_run) == before and not (single_run / "ensemble.json").exists()


def test_a_single_run_over_an_ensemble_directory_is_refused(corpus_dir, tmp_path):
    run = tmp_path / "ens"
    run.mkdir()
    (run / "ensemble.json").write_text(json.dumps({"format": 1, "members": ["members/0"]}))
    before = snapshot(run)
    refused(train(corpus_dir, tmp_path, run, "--max-steps", "2"), "already holds an ensemble run")
    assert snapshot(run) == before


@pytest.mark.parametrize("ensemble", ["1", "2"])
def test_train_refuses_a_directory_of_foreign_files(corpus_dir, tmp_path, ensemble):
    before = foreign_dir(tmp_path / "mine")
    r = train(corpus_dir, tmp_path, tmp_path / "mine", "--max-steps", "2", "--ensemble", ensemble)
    refused(r, "holds files no run wrote")
    assert snapshot(tmp_path / "mine") == before


def test_a_resume_into_another_directory_refuses_foreign_files(single_run, tmp_path):
    before = foreign_dir(tmp_path / "mine")
    r = run_cli("--resume-from", single_run, "--out-dir", tmp_path / "mine", "--max-steps", "12", cwd=tmp_path)
    refused(r, "holds files no run wrote")
    assert snapshot(tmp_path / "mine") == before


# ---- suspected: --resume-from latest --out-dir ENSEMBLE ----
@pytest.mark.slow
def test_resume_latest_with_an_ensemble_out_dir_resumes_the_ensemble(corpus_dir, tmp_path):
    run = tmp_path / "ens"
    r = train(corpus_dir, tmp_path, run, "--max-steps", "4", "--ensemble", "2")
    assert r.returncode == 0, r.stderr
    members = [snapshot(run / "members" / str(i) / "checkpoints") for i in range(2)]
    r = run_cli("--resume-from", "latest", "--out-dir", run, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "Resuming the ensemble" in r.stdout and (run / "ensemble.json").exists()
    assert [snapshot(run / "members" / str(i) / "checkpoints") for i in range(2)] == members  # finished: kept


# ---- item 4: prepare removes only what it wrote ----
def prepare(corpus: Path, out: Path, *extra) -> subprocess.CompletedProcess:
    return run_cli("prepare", corpus, "--out", out, "--vocab-size", "300", "--workers", "1", *extra)


def test_prepare_refuses_a_directory_it_did_not_write(corpus_dir, tmp_path):
    before = foreign_dir(tmp_path / "mine")
    refused(prepare(corpus_dir, tmp_path / "mine"), "is not a token store written by blueberry prepare")
    assert snapshot(tmp_path / "mine") == before


def test_prepare_refuses_a_run_directory(single_run, corpus_dir):
    before = snapshot(single_run)
    refused(prepare(corpus_dir, single_run), "is not a token store")
    assert snapshot(single_run) == before


def test_a_re_prepare_replaces_only_its_own_files(corpus_dir, tmp_path):
    store = tmp_path / "store"
    assert prepare(corpus_dir, store).returncode == 0
    (store / "notes.txt").write_text("mine\n")
    (store / "shard-keep").mkdir()
    (store / "shard-keep" / "x").write_text("mine\n")
    old_tokenizer = (store / "tokenizer.json").read_bytes()
    r = prepare(corpus_dir, store, "--vocab-size", "280")  # other settings: a rebuild
    assert r.returncode == 0 and "rebuilding" in r.stdout, r.stderr
    assert (store / "notes.txt").read_text() == "mine\n" and (store / "shard-keep" / "x").read_text() == "mine\n"
    assert (store / "tokenizer.json").read_bytes() != old_tokenizer  # its own: replaced
    manifest = json.loads((store / "manifest.json").read_text())
    assert manifest["complete"] and manifest["vocab_size"] <= 280


def test_prepare_never_takes_or_removes_a_tokenizer_json_it_did_not_write(corpus_dir, tmp_path):
    store = tmp_path / "store"
    assert prepare(corpus_dir, store).returncode == 0
    (store / "tokenizer.json").write_text("{\"mine\": true}\n")  # the user's, in place of ours
    refused(prepare(corpus_dir, store, "--vocab-size", "280"), "was not written by blueberry prepare")
    assert (store / "tokenizer.json").read_text() == "{\"mine\": true}\n"


def test_merge_refuses_a_foreign_target(corpus_dir, tmp_path):
    assert prepare(corpus_dir, tmp_path / "p0").returncode == 0
    before = foreign_dir(tmp_path / "mine")
    refused(run_cli("prepare", "--merge", tmp_path / "mine", tmp_path / "p0"), "is not a token store")
    assert snapshot(tmp_path / "mine") == before


# ---- item 7: README's multi-machine prepare, as written ----
def test_readme_multi_machine_prepare_merges_and_trains(corpus_dir, tmp_path):
    readme = (ROOT / "README.md").read_text()
    assert "--out part0 --shard-index 0 --num-shards 2" in readme and "prepare --merge stores/web part0 part1" in readme
    for i in range(2):  # "on machine 0 (1 on machine 1)": nothing passed between them
        r = run_cli("prepare", f"{corpus_dir}/", "--out", f"part{i}", "--shard-index", i, "--num-shards", 2,
                    "--vocab-size", "300", "--workers", "1", cwd=tmp_path)
        assert r.returncode == 0, r.stderr
    r = run_cli("prepare", "--merge", "stores/web", "part0", "part1", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    merged = json.loads((tmp_path / "stores/web/manifest.json").read_text())
    assert merged["documents"] == 12 and len(merged["shards"]) >= 2
    r = run_cli("--dataset", "stores/web", "--out-dir", "run", "--max-steps", "3", *FAST, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "run/summary.json").read_text())["step"] == 3


# ---- export, import, quantize, eval, compare: refusals ----
def test_export_import_and_quantize_refuse_a_foreign_output(single_run, tmp_path):
    before = foreign_dir(tmp_path / "mine")
    refused(run_cli("export", single_run, tmp_path / "mine"), "exists and is not empty")
    refused(run_cli("quantize", single_run, tmp_path / "mine", "--eval-batches", "1"), "exists and is not empty")
    assert run_cli("export", single_run, tmp_path / "hf").returncode == 0
    refused(run_cli("import", tmp_path / "hf", tmp_path / "mine"), "exists and is not empty")
    assert snapshot(tmp_path / "mine") == before
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]
    r = run_cli("import", tmp_path / "hf", tmp_path / "imported")
    assert r.returncode == 0, r.stderr
    assert run_cli("eval", "--checkpoint", tmp_path / "imported", "--batches", "1").returncode == 0


def test_eval_refuses_reports_it_did_not_write_and_replaces_its_own(single_run, tmp_path):
    run = copy_of(single_run, tmp_path)
    (run / "eval.md").write_text("my own notes\n")
    before = snapshot(run)
    refused(run_cli("eval", "--checkpoint", run, "--batches", "1"), "was not written by blueberry eval")
    assert snapshot(run) == before
    (run / "eval.md").unlink()
    for _ in range(2):  # a second eval replaces the first's reports
        r = run_cli("eval", "--checkpoint", run, "--batches", "1")
        assert r.returncode == 0, r.stderr
    assert "checkpoint" in json.loads((run / "eval.json").read_text())


def test_compare_refuses_a_file_it_did_not_write_and_replaces_its_own(single_run, tmp_path):
    mine = tmp_path / "plot.png"
    mine.write_bytes(b"\x89PNG my own picture")
    refused(run_cli("compare", single_run, "--out", mine), "was not written by blueberry compare")
    assert mine.read_bytes() == b"\x89PNG my own picture"
    ours = tmp_path / "ours.png"
    for _ in range(2):
        r = run_cli("compare", single_run, "--out", ours)
        assert r.returncode == 0, r.stderr
    assert ours.read_bytes().startswith(b"\x89PNG")


# ---- removal calls touch only what the command wrote ----
WRITERS = ["atomic.py", "data/prepare.py", "data/token_store.py", "runs/checkpoint.py",
           "training/sharded_checkpoint.py", "training/combine_runs.py", "runs/layout.py",
           "training/ensemble.py", "runs/ensemble_dir.py", "inference/quantize_run.py", "export/huggingface.py",
           "training/init_from.py", "evaluation/compare.py", "cli/use_cmds.py", "cli/prepare_cmd.py"]
# each removal in the writers, and what makes it provably the command's own
REMOVALS = {
    "atomic.py": ["Path(tmp).unlink(missing_ok=True)",  # its own mkstemp name
                  "shutil.rmtree(tmp, ignore_errors=True)"],  # its own mkdtemp name
    "data/prepare.py": ["shutil.rmtree(store / entry[\"name\"])",  # a shard-NNNNN the manifest lists
                        "(store / \"tokenizer.json\").unlink()",  # checksum recorded by manifest or marker
                        "(store / \"manifest.json\").unlink()",  # a valid manifest of a claimed store
                        "p.unlink(missing_ok=True)",  # .manifest.* mkstemp temporaries
                        "shutil.rmtree(p, ignore_errors=True)"],  # .shard-* mkdtemp temporaries
    "data/token_store.py": ["shutil.rmtree(final)",  # shard-NNNNN of a claimed store, being rewritten
                            "shutil.rmtree(self.tmp, ignore_errors=True)"],  # its own mkdtemp
    "runs/checkpoint.py": ["shutil.rmtree(final)", "shutil.rmtree(tmp, ignore_errors=True)",
                               "shutil.rmtree(old)", "shutil.rmtree(old, ignore_errors=True)",
                               "tmp.unlink(missing_ok=True)",  # checkpoints/ step_*, .step_*, .best.*, .latest.*
                               "shutil.rmtree(other, ignore_errors=True)"],  # the same step_N in the other format
    # .step_N.dcp.partial in the run's own checkpoints/ (the run directory was checked as this run's at start)
    "training/sharded_checkpoint.py": ["shutil.rmtree(tmp, ignore_errors=True)"],
    "runs/layout.py": ["probe.unlink()"],  # its own .write-test-PID
}


def test_removals_in_the_writers_only_touch_their_own_names():
    """Every rmtree/unlink/remove in the writing code is one of the reviewed calls above: a new one fails this
    test until it is looked at (what proves that the path is the command's own?) and listed."""
    for name in WRITERS:
        lines = [line.strip() for line in (ROOT / "blueberry" / name).read_text().splitlines()]
        calls = [line for line in lines if any(c in line for c in ("rmtree(", ".unlink(", "os.remove("))
                 and not line.startswith(("#", "\"\"\""))]
        for call in calls:
            assert any(ok in call for ok in REMOVALS.get(name, [])), (name, call)


# ---- kill -9 at a random moment: the old state or the complete new one ----
def kill_at(cmd: list, delay: float, cwd: Path, started=lambda: True) -> None:
    """Start the command in a process group of its own and SIGKILL the whole group `delay` seconds after
    `started()` (polled) first holds: a moment in the middle of its writing, not in Python's start-up."""
    proc = subprocess.Popen([sys.executable, "-m", "blueberry", *map(str, cmd)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=cli_env(), cwd=cwd, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while not started() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        pass
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=60)


def complete(kind: str, out: Path, tmp_path: Path) -> bool:
    """Whether `out`, as `kind` left it, is complete and loadable."""
    if kind == "prepare":
        from blueberry.data.token_store import open_split

        return bool(open_split(out, "train", verify=True))
    if kind == "compare":
        return out.read_bytes().startswith(b"\x89PNG") and out.read_bytes().endswith(b"IEND\xaeB`\x82")
    if kind == "eval":
        return ("checkpoint" in json.loads((out / "eval.json").read_text())
                and (out / "eval.md").read_text().startswith("# Evaluation of"))
    target = out
    if kind == "export":  # an HF directory is complete when it imports back
        target = tmp_path / f"re-{out.name}"
        assert run_cli("import", out, target).returncode == 0
    r = run_cli("eval", "--checkpoint", target, "--batches", "1")
    return r.returncode == 0


def writer_command(kind: str, run: Path, corpus: Path, out: Path) -> list:
    return {"export": ["export", run, out], "quantize": ["quantize", run, out, "--eval-batches", "1"],
            "prepare": ["prepare", corpus, "--out", out, "--vocab-size", "300", "--workers", "1"],
            "eval": ["eval", "--checkpoint", run, "--batches", "1"], "compare": ["compare", run, "--out", out]}[kind]


def _writing(kind: str, out: Path, tmp_path: Path) -> bool:
    """The command has begun to write: its temporary directory (export, quantize), its store (prepare)."""
    if kind in ("export", "quantize"):
        return any(tmp_path.glob(f".{out.name}.partial-*")) or out.exists()
    if kind == "prepare":
        return out.exists()
    return True  # eval, compare: their one write is brief; they are killed at random moments instead


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["export", "quantize", "prepare", "eval", "compare"])
def test_kill_9_leaves_the_old_state_or_the_complete_new_one(kind, single_run, corpus_dir, tmp_path):
    rng = random.Random(kind)
    run = copy_of(single_run, tmp_path)
    if kind == "eval":  # an old report to keep or replace whole
        assert run_cli("eval", "--checkpoint", run, "--batches", "1").returncode == 0
    brief = kind in ("eval", "compare")
    for attempt, delay in enumerate([rng.uniform(0.0, 0.3), rng.uniform(0.2, 1.5)]):
        delay += rng.uniform(2.0, 6.0) if brief else 0.0
        out = {"eval": run, "compare": tmp_path / "c.png"}.get(kind, tmp_path / f"{kind}{attempt}")
        cmd = writer_command(kind, run, corpus_dir, out)
        kill_at(cmd, delay, tmp_path, started=lambda: _writing(kind, out, tmp_path))
        if kind == "prepare":  # a killed prepare resumes (or finds itself complete): then it is whole
            r = run_cli(*cmd)
            assert r.returncode == 0, r.stderr
        present = out.exists() and (out.is_file() or any(out.iterdir()))
        assert not present or complete(kind, out, tmp_path), (kind, delay)


@pytest.mark.slow
def test_kill_9_during_training_leaves_a_loadable_latest_checkpoint(corpus_dir, tmp_path):
    run = tmp_path / "run"
    cmd = ["--dataset", corpus_dir, "--cache-dir", tmp_path / "cache", "--out-dir", run, "--max-steps", "400",
           "--checkpoint-every", "2", *FAST]
    kill_at(cmd, random.Random(7).uniform(0.0, 2.0), tmp_path, started=lambda: (run / "checkpoints").is_dir())
    json.loads((run / "config.json").read_text())  # whole, never half written
    if (run / "checkpoints" / "latest").exists():
        r = run_cli("eval", "--checkpoint", run, "--batches", "1")
        assert r.returncode == 0, r.stderr


def test_atomic_outputs_get_the_modes_a_plain_write_would(tmp_path):
    """Not mkstemp's 0o600 / mkdtemp's 0o700: another user (a server, a second machine) must read them."""
    from blueberry.atomic import _umask, atomic_write_text, building_dir

    umask = _umask()
    path = atomic_write_text(tmp_path / "report.json", "{}")
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    path.chmod(0o640)
    atomic_write_text(path, "{}")  # a replaced file keeps its mode
    assert path.stat().st_mode & 0o777 == 0o640
    with building_dir(tmp_path / "out") as tmp:
        (tmp / "x").write_text("x")
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o777 & ~umask
