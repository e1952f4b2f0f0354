"""torchrun with 2 CPU processes (gloo): DDP equals one process with the same global batch, FSDP2 within
tolerance (for the dense and MoE transformers and for each of Mamba-2, retention and Mixture-of-Depths),
distributed Muon equals single-process Muon, and a 2-process resume continues exactly."""

import os
import signal
import sys
import time

import pytest

from blueberry.runs.checkpoint import is_sharded_checkpoint
from blueberry.runs.layout import read_metrics
from helpers import ROOT, TINY_FLAGS, cli_env, run_in_group

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="gloo multi-process tests run on Linux")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_cmd(*args, nproc=2) -> list:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *map(str, args)]


def torchrun(*args, nproc=2, timeout=300):
    """A torchrun job in its own process group, killed whole (no orphan rank) if it outlives `timeout`."""
    return run_in_group(torchrun_cmd(*args, nproc=nproc), timeout, env=cli_env(), cwd=ROOT)


def losses(run_dir):
    return [r["loss"] for r in read_metrics(run_dir) if r["kind"] == "train"]


def common(corpus_dir, tmp_path, batch):
    flags = list(TINY_FLAGS)
    flags[flags.index("--batch-size") + 1] = str(batch)
    return ["--dataset", corpus_dir, "--cache-dir", tmp_path / "cache", "--no-amp", "--eval-every", "5",
            "--checkpoint-every", "5", "--keep-checkpoints", "3", "--load-balancing-weight", "0",
            "--router-z-loss-weight", "0", *flags]


def single(*args, timeout=300):
    return run_in_group([sys.executable, "train.py", *args], timeout, env=cli_env(), cwd=ROOT)


def evals(run_dir):
    return [r for r in read_metrics(run_dir) if r["kind"] == "eval"]


@pytest.mark.parametrize("model_type", ["moe"])  # dense blocks under DDP: the mixers' test below
def test_ddp_matches_single_process(corpus_dir, tmp_path, model_type):
    one = single(*common(corpus_dir, tmp_path, 8), "--model-type", model_type, "--max-steps", "10",
                 "--out-dir", tmp_path / "one")
    assert one.returncode == 0, one.stderr
    two = torchrun("train.py", *common(corpus_dir, tmp_path, 4), "--model-type", model_type, "--max-steps", "10",
                   "--out-dir", tmp_path / "two", "--parallel", "ddp")
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(a) == len(b) == 10
    assert max(abs(x - y) for x, y in zip(a, b)) <= 1e-5, (a, b)
    # evaluation: totals over ranks, so the figures of the whole validation set (not a mean of ratios)
    for e1, e2 in zip(evals(tmp_path / "one"), evals(tmp_path / "two")):
        assert e1["tokens"] == e2["tokens"]
        assert abs(e1["bits_per_byte"] - e2["bits_per_byte"]) <= 1e-5, (e1, e2)
        assert abs(e1["loss"] - e2["loss"]) <= 1e-5


def test_fsdp2_matches_single_process(corpus_dir, tmp_path):
    """FSDP2 over activation-checkpointed blocks (selective) against one process without checkpointing:
    the two compose, and neither changes the numbers."""
    one = single(*common(corpus_dir, tmp_path, 8), "--model-type", "standard", "--max-steps", "10",
                 "--out-dir", tmp_path / "one")
    assert one.returncode == 0, one.stderr
    two = torchrun("train.py", *common(corpus_dir, tmp_path, 4), "--model-type", "standard", "--max-steps", "10",
                   "--out-dir", tmp_path / "two", "--parallel", "fsdp", "--activation-checkpointing", "selective")
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert max(abs(x - y) for x, y in zip(a, b)) <= 1e-4, (a, b)  # fp32 reductions in another order


@pytest.mark.parametrize("layers,parallel", [("mamba:mlp", "fsdp"), ("retention:mlp", "ddp"),
                                             ("attn:mlp,mod(attn:mlp)", "ddp")])
def test_each_new_mixer_under_torchrun_matches_one_process(corpus_dir, tmp_path, layers, parallel):
    mixer = ["--layers", layers, "--ssm-head-dim", "16", "--ssm-state", "8", "--scan-chunk", "16",
             "--mod-capacity", "0.5", "--max-steps", "6"]
    one = single(*common(corpus_dir, tmp_path, 8), *mixer, "--out-dir", tmp_path / "one")
    assert one.returncode == 0, one.stderr[-3000:]
    two = torchrun("train.py", *common(corpus_dir, tmp_path, 4), *mixer, "--out-dir", tmp_path / "two",
                   "--parallel", parallel)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(a) == len(b) == 6
    assert max(abs(x - y) for x, y in zip(a, b)) <= (1e-4 if parallel == "fsdp" else 1e-5), (a, b)


def test_distributed_muon_equals_single_process():
    r = torchrun("tests/dist_muon_check.py")
    assert r.returncode == 0 and "DIST_MUON_OK" in r.stdout, r.stderr[-3000:]


# DDP with the MoE: test_two_process_resume_on_a_sharded_store_continues_exactly (and test_expert_parallel.py)
@pytest.mark.parametrize("parallel,model_type", [("fsdp", "standard")])
def test_two_process_resume_continues_exactly(corpus_dir, tmp_path, parallel, model_type):
    args = [*common(corpus_dir, tmp_path, 4), "--model-type", model_type, "--max-steps", "10", "--parallel", parallel]
    ck = _train_then_resume_at_step_5(args, tmp_path)
    # FSDP2 writes a sharded checkpoint, DDP one file set (the resumes on other world sizes: test_dcp.py)
    assert is_sharded_checkpoint(ck) == (parallel == "fsdp")


def test_two_process_resume_on_a_sharded_store_continues_exactly(corpus_dir, tmp_path):
    """Disjoint windows per rank from a store of several shards, read ahead by a thread; resume is exact."""
    from helpers import run_cli

    r = run_cli("prepare", corpus_dir, "--out", tmp_path / "store", "--vocab-size", "300", "--shard-tokens", "2000",
                "--workers", "1", "--val-fraction", "0.3")
    assert r.returncode == 0, r.stderr[-2000:]
    _train_then_resume_at_step_5([*common(corpus_dir, tmp_path, 4), "--dataset", tmp_path / "store",
                                  "--max-steps", "10"], tmp_path)


def _train_then_resume_at_step_5(args, tmp_path):
    """Train 10 steps on 2 processes, resume from step 5: the resumed losses are the same floats. The checkpoint."""
    full = torchrun("train.py", *args, "--out-dir", tmp_path / "full")
    assert full.returncode == 0, full.stderr[-3000:]
    ck = next((tmp_path / "full" / "checkpoints").glob("step_000005*"))  # step_000005.dcp under FSDP2
    resumed = torchrun("train.py", "--resume-from", ck, "--out-dir", tmp_path / "resumed")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert losses(tmp_path / "resumed") == losses(tmp_path / "full")[5:]
    return ck


def _rank_pid(torchrun_pid: int, rank: int, timeout: float = 120) -> int:
    """The pid of the worker of `rank` among torchrun's descendants (read from /proc)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
                stat = open(f"/proc/{pid}/stat").read()
            except OSError:
                continue
            if f"RANK={rank}".encode() in env and int(stat.rsplit(")", 1)[1].split()[1]) == torchrun_pid:
                return int(pid)
        time.sleep(0.2)
    raise AssertionError(f"rank {rank} of torchrun {torchrun_pid} not found")


@pytest.mark.parametrize("parallel,model_type", [("ddp", "moe"), ("fsdp", "standard")])
def test_a_signal_to_one_rank_stops_every_rank_at_the_same_step(corpus_dir, tmp_path, parallel, model_type):
    import subprocess

    from blueberry.runs.checkpoint import read_state, resolve_checkpoint
    from helpers import _kill_group

    run = tmp_path / "run"
    cmd = torchrun_cmd("train.py", *common(corpus_dir, tmp_path, 4), "--model-type", model_type, "--no-compile",
                       "--max-steps", "100000", "--eval-every", "100000", "--checkpoint-every", "100000",
                       "--parallel", parallel, "--out-dir", run)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env(), cwd=ROOT,
                            start_new_session=True)
    try:
        deadline = time.time() + 180
        while not (run / "metrics.jsonl").exists() or len(losses(run)) < 3:
            assert time.time() < deadline and proc.poll() is None, "training did not start"
            time.sleep(0.1)
        os.kill(_rank_pid(proc.pid, 1), signal.SIGTERM)  # rank 1 only: rank 0 must learn of it
        out, err = proc.communicate(timeout=180)
    finally:
        _kill_group(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0, "a preempted job must not look finished"
    assert "Stopped by SIGTERM" in out, err[-3000:]
    assert "exitcode  : 143" in err or "exit code 143" in err or "143" in err
    steps = [r["step"] for r in read_metrics(run) if r["kind"] == "train"]
    state = read_state(resolve_checkpoint(run))
    assert state["step"] == steps[-1]  # one checkpoint, of the step every rank stopped after


@pytest.mark.parametrize("parallel,model_type", [("ddp", "moe"), ("fsdp", "standard")])
def test_jobs_exit_cleanly_three_times_in_a_row(corpus_dir, tmp_path, parallel, model_type):
    """The exit hang was intermittent (a teardown race): one green run proves little, six in a row (three per
    engine) more, beside the other 30-odd torchrun jobs of the suite, each of which must exit too."""
    for i in range(3):
        r = torchrun("train.py", *common(corpus_dir, tmp_path, 4), "--model-type", model_type, "--max-steps", "2",
                     "--eval-every", "2", "--parallel", parallel, "--out-dir", tmp_path / f"run{i}", timeout=120)
        assert r.returncode == 0, f"run {i}: {r.stderr[-3000:]}"


def test_a_rank_leaves_with_its_exit_code_and_all_its_output(tmp_path):
    """`exit_process` skips interpreter finalization on a torchrun rank; what the rank printed still arrives."""
    import subprocess

    script = ("import sys\nfrom blueberry.training.distributed import exit_process\n"
              "print('x' * 100000)\nprint('last line', file=sys.stderr, end='')\nexit_process(3)\n")
    env = {**cli_env(), "WORLD_SIZE": "2"}
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 3
    assert r.stdout == "x" * 100000 + "\n" and r.stderr.endswith("last line")
