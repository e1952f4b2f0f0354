"""Bad input, faults and untrusted files: one clear message, the right exit code, no lost data."""

import os
import pickle
import random
import signal
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from blueberry.data import load_documents
from blueberry.errors import CheckpointError, DataError
from blueberry.models import create_model
from blueberry.runs import checkpoint as ckpt_mod
from blueberry.runs.checkpoint import load_weights, read_state, resolve_checkpoint, save_checkpoint
from blueberry.training import run_training
from helpers import TINY_FLAGS, popen_cli, run_cli



# ---------------------------------------------------------------- data
def test_empty_directory(tmp_path):
    with pytest.raises(DataError, match="has no .txt/.jsonl/.parquet files"):
        load_documents(str(tmp_path))


def test_whitespace_only_files(tmp_path):
    (tmp_path / "a.txt").write_text("   \n\n\t")
    (tmp_path / "b.txt").write_text("")
    with pytest.raises(DataError, match="empty or whitespace"):
        load_documents(str(tmp_path))


def test_non_utf8_is_decoded_with_warning_naming_the_file(tmp_path):
    f = tmp_path / "latin.txt"
    f.write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    with pytest.warns(UserWarning, match="latin.txt"):
        docs = load_documents(str(f))
    assert docs[0].text.startswith("caf\ufffd")


def test_malformed_jsonl_names_file_and_line(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "ok"}\n{"text": broken\n')
    with pytest.raises(DataError, match=r"d.jsonl:2: malformed JSON"):
        load_documents(str(f))


def test_parquet_without_text_column(tmp_path):
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "d.parquet")
    with pytest.raises(DataError, match="no 'text' column.*body"):
        load_documents(str(tmp_path / "d.parquet"))


def test_corpus_too_small_says_how_many_tokens(tiny, tmp_path):
    small = tmp_path / "small"
    small.mkdir()
    for i in range(4):
        (small / f"{i}.txt").write_text("a few words\n")
    cfg = tiny(dataset=str(small), max_seq_len=64)
    with pytest.raises(DataError, match=r"need at least 65 tokens .* have \d+"):
        run_training(cfg)


# ---------------------------------------------------------------- checkpoints
@pytest.fixture
def trained_run(tiny):
    cfg = tiny(max_steps=4, checkpoint_every=2, eval_every=2)
    run_training(cfg)
    return cfg


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_checkpoint(tmp_path / "nothing")


def test_truncated_checkpoint_files(trained_run):
    ck = resolve_checkpoint(trained_run.out_dir)
    weights = ck / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="damaged or truncated"):
        load_weights(ck, create_model(trained_run))
    state = ck / "state.pt"
    state.write_bytes(state.read_bytes()[:300])
    with pytest.raises(CheckpointError, match="damaged or truncated"):
        read_state(ck)


def test_different_architecture_lists_tensors(trained_run):
    ck = resolve_checkpoint(trained_run.out_dir)
    other = create_model(trained_run.replace(d_model=64, n_heads=4))
    with pytest.raises(CheckpointError, match=r"different architecture: .*attn.k_proj.weight: checkpoint \(32, 32\) vs model \(64, 64\)"):
        load_weights(ck, other)


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/blueberry_pwned",))


def test_malicious_pickle_is_refused(trained_run):
    ck = resolve_checkpoint(trained_run.out_dir)
    with open(ck / "state.pt", "wb") as f:
        pickle.dump({"format": 1, "evil": Evil()}, f)
    Path("/tmp/blueberry_pwned").unlink(missing_ok=True)
    with pytest.raises(CheckpointError, match="refused"):
        read_state(ck)
    assert not Path("/tmp/blueberry_pwned").exists()


def test_different_tokenizer_is_refused(trained_run, tmp_path):
    ck = resolve_checkpoint(trained_run.out_dir)
    state = read_state(ck)
    state["tokenizer"] = "bpe:300:somethingelse"
    with pytest.raises(CheckpointError, match="different tokenizer"):
        run_training(trained_run.replace(out_dir=str(tmp_path / "r2")), resume_state=state,
                     resume_checkpoint=ck)


def test_failed_checkpoint_write_keeps_previous(trained_run, monkeypatch):
    before = resolve_checkpoint(trained_run.out_dir)
    model = create_model(trained_run)

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt_mod, "save_model", disk_full)
    with pytest.raises(OSError):
        save_checkpoint(trained_run.out_dir, 99, model, {"x": 1})
    after = resolve_checkpoint(trained_run.out_dir)
    assert after == before
    load_weights(after, model)
    assert not [p for p in (Path(trained_run.out_dir) / "checkpoints").iterdir() if p.name.startswith(".step")]


def test_unwritable_run_directory_fails_before_training(tmp_path, corpus_dir):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    r = run_cli("--dataset", corpus_dir, "--out-dir", blocker / "run", *TINY_FLAGS)
    assert r.returncode == 2 and "not writable" in r.stderr and "Traceback" not in r.stderr


def test_debug_shows_traceback(tmp_path):
    r = run_cli("--dataset", tmp_path / "nowhere", "--out-dir", tmp_path / "run", "--debug", *TINY_FLAGS)
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_resume_from_garbage_path(tmp_path):
    (tmp_path / "ck").mkdir()
    r = run_cli("--resume-from", tmp_path / "ck")
    assert r.returncode == 1 and "not a complete checkpoint" in r.stderr and "Traceback" not in r.stderr


# ---------------------------------------------------------------- signals and kills
def _wait_for_steps(run_dir: Path, steps: int, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        m = run_dir / "metrics.jsonl"
        if m.exists() and sum(1 for ln in m.read_text().splitlines() if '"train"' in ln) >= steps:
            return
        if proc.poll() is not None:
            raise AssertionError(f"training ended early: {proc.stderr.read()}")
        time.sleep(0.05)
    raise AssertionError("training did not reach the expected step")


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_saves_and_exits_with_the_signal_code(corpus_dir, tmp_path, sig, code):
    run = tmp_path / "run"
    proc = popen_cli("--dataset", corpus_dir, "--cache-dir", tmp_path / "c", "--out-dir", run, "--no-compile",
                     "--max-steps", "100000", "--eval-every", "100000", "--checkpoint-every", "100000", *TINY_FLAGS)
    _wait_for_steps(run, 3, proc)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err  # a preempted run is not a finished one
    assert "Resume with" in out
    ck = resolve_checkpoint(run)
    assert read_state(ck)["step"] >= 3


def test_random_kill_9_always_leaves_a_loadable_checkpoint(corpus_dir, tmp_path):
    run = tmp_path / "run"
    rng = random.Random(7)
    # --no-compile: the kills land in the steps and their checkpoints, not in compiling
    common = ["--dataset", corpus_dir, "--cache-dir", tmp_path / "c", "--checkpoint-every", "1", "--no-compile",
              "--eval-every", "100000", "--keep-checkpoints", "2", *TINY_FLAGS]
    proc = popen_cli(*common, "--out-dir", run, "--max-steps", "100000")
    _wait_for_steps(run, 2, proc)
    proc.kill()
    proc.wait()
    for attempt in range(4):
        ck = resolve_checkpoint(run)
        model = create_model(__import__("blueberry.configs", fromlist=["x"]).AdaptiveMoEModelConfig.from_dict(
            read_state(ck)["config"]))
        load_weights(ck, model)
        proc = popen_cli("--resume-from", run)
        time.sleep(rng.uniform(2.5, 6.0))  # start-up takes ~2 s, then a checkpoint every step (~20 ms)
        proc.kill()
        proc.wait()
    ck = resolve_checkpoint(run)
    step = read_state(ck)["step"]
    r = run_cli("--resume-from", run, "--max-steps", str(step + 2))
    assert r.returncode == 0, r.stderr
    assert read_state(resolve_checkpoint(run))["step"] == step + 2


def test_optimizer_state_with_other_parameter_groups_is_refused_clearly():
    from blueberry.errors import CheckpointError
    from blueberry.runs.checkpoint import check_optimizer_layout

    a, b = torch.nn.Parameter(torch.randn(4, 4)), torch.nn.Parameter(torch.randn(4, 4))
    ours = torch.optim.AdamW([{"params": [a]}, {"params": [b]}])
    check_optimizer_layout([ours], [ours.state_dict()])  # the same layout passes
    older = torch.optim.AdamW([a, b]).state_dict()  # one group of two: another version's layout
    with pytest.raises(CheckpointError, match=r"sizes \[2\].*builds \[1, 1\]"):
        check_optimizer_layout([ours], [older])
    with pytest.raises(CheckpointError, match="same --optimizer"):
        check_optimizer_layout([ours], [older, older])
