"""torchrun with 2 CPU processes (gloo): DDP equals one process with the same global batch, FSDP2 within
tolerance, distributed Muon equals single-process Muon, and a 2-process resume continues exactly."""

import subprocess
import sys

import pytest

from blueberry.training.metrics import read_metrics
from helpers import ROOT, TINY_FLAGS, cli_env

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="gloo multi-process tests run on Linux")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args, nproc=2, timeout=300):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=cli_env(), cwd=ROOT)


def losses(run_dir):
    return [r["loss"] for r in read_metrics(run_dir) if r["kind"] == "train"]


def common(corpus_dir, tmp_path, batch):
    flags = list(TINY_FLAGS)
    flags[flags.index("--batch-size") + 1] = str(batch)
    return ["--dataset", corpus_dir, "--cache-dir", tmp_path / "cache", "--no-amp", "--eval-every", "5",
            "--checkpoint-every", "5", "--keep-checkpoints", "3", "--load-balancing-weight", "0",
            "--router-z-loss-weight", "0", *flags]


def single(*args, timeout=300):
    return subprocess.run([sys.executable, "train.py", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=cli_env(), cwd=ROOT)


@pytest.mark.parametrize("model_type", ["standard", "moe"])
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


def test_fsdp2_matches_single_process(corpus_dir, tmp_path):
    one = single(*common(corpus_dir, tmp_path, 8), "--model-type", "standard", "--max-steps", "10",
                 "--out-dir", tmp_path / "one")
    assert one.returncode == 0, one.stderr
    two = torchrun("train.py", *common(corpus_dir, tmp_path, 4), "--model-type", "standard", "--max-steps", "10",
                   "--out-dir", tmp_path / "two", "--parallel", "fsdp")
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert max(abs(x - y) for x, y in zip(a, b)) <= 1e-4, (a, b)  # fp32 reductions in another order


def test_distributed_muon_equals_single_process():
    r = torchrun("tests/dist_muon_check.py")
    assert r.returncode == 0 and "DIST_MUON_OK" in r.stdout, r.stderr[-3000:]


@pytest.mark.parametrize("parallel,model_type", [("ddp", "moe"), ("fsdp", "standard")])
def test_two_process_resume_continues_exactly(corpus_dir, tmp_path, parallel, model_type):
    args = [*common(corpus_dir, tmp_path, 4), "--model-type", model_type, "--max-steps", "10", "--parallel", parallel]
    full = torchrun("train.py", *args, "--out-dir", tmp_path / "full")
    assert full.returncode == 0, full.stderr[-3000:]
    ck = tmp_path / "full" / "checkpoints" / "step_000005"
    resumed = torchrun("train.py", "--resume-from", ck, "--out-dir", tmp_path / "resumed")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert losses(tmp_path / "resumed") == losses(tmp_path / "full")[5:]
    wrong = single("--resume-from", ck, "--out-dir", tmp_path / "wrong")
    assert wrong.returncode == 1 and "same --nproc_per_node" in wrong.stderr
