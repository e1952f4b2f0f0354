"""Expert parallelism under torchrun (gloo, CPU): 2 processes (the rest of the model under DDP) and 4 (two
groups, the rest under FSDP2) holding a share of the experts each give the losses, evaluations and final
weights of one process with the same global batch (1e-5); the DDP run's single-file checkpoint resumes exactly;
under a capacity limit the same tokens are dropped as by plain data parallelism; a job of two torchrun agents
(two "nodes" meeting by c10d rendezvous on 127.0.0.1) with FSDP2 and expert parallelism writes a sharded
checkpoint (each rank its own experts) that resumes exactly on one node, and on one process without it."""

import sys

import pytest
import torch
from safetensors.torch import load_file

from blueberry.runs.checkpoint import is_sharded_checkpoint, resolve_checkpoint
from blueberry.runs.dcp_reader import SafeReader, tied_names
from blueberry.runs.loading import load_model
from blueberry.runs.layout import read_metrics
from test_distributed import common, evals, losses, single, torchrun

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(sys.platform != "linux", reason="gloo multi-process tests run on Linux")]


def _weights(run_dir):
    """The latest checkpoint's weights, single-file or sharded (read whole in this process)."""
    checkpoint = resolve_checkpoint(run_dir)
    if is_sharded_checkpoint(checkpoint):
        model = load_model(checkpoint, device="cpu")[0]
        return {k: v for k, v in model.state_dict().items() if k not in tied_names(model)}  # as safetensors keeps
    return load_file(str(checkpoint / "model.safetensors"))


def _close(a: dict, b: dict) -> None:
    """Within 1e-5; the embedding within 1e-4: AdamW divides by sqrt(v), so a row whose gradients are of the
    size of fp32 noise moves by up to the learning rate — plain DDP is 1.1e-5 off one process there too."""
    assert a.keys() == b.keys()
    for k in a:
        worst = (a[k].float() - b[k].float()).abs().max().item()
        assert worst <= (1e-4 if k == "embed.weight" else 1e-5), (k, worst)


@pytest.mark.parametrize("nproc, degree, parallel", [(2, 2, "ddp"), (4, 2, "fsdp")])  # (4, 2): two groups
def test_expert_parallel_equals_one_process(corpus_dir, tmp_path, nproc, degree, parallel):
    steps = ["--max-steps", "5", "--num-experts", "8", "--top-k", "2", "--no-compile"]
    one = single(*common(corpus_dir, tmp_path, 8), *steps, "--out-dir", tmp_path / "one")
    assert one.returncode == 0, one.stderr[-3000:]
    ep = torchrun("train.py", *common(corpus_dir, tmp_path, 8 // nproc), *steps, "--out-dir", tmp_path / "ep",
                  "--expert-parallel", degree, "--parallel", parallel, "--checkpoint-every", "3", nproc=nproc)
    assert ep.returncode == 0, ep.stderr[-3000:]
    a, b = losses(tmp_path / "one"), losses(tmp_path / "ep")
    assert len(a) == len(b) == 5 and max(abs(x - y) for x, y in zip(a, b)) <= 1e-5, (a, b)
    norms = [[r["grad_norm"] for r in read_metrics(tmp_path / n) if r["kind"] == "train"] for n in ("one", "ep")]
    assert max(abs(x - y) / x for x, y in zip(*norms)) <= 1e-5, norms  # every expert counted once in the clip
    for e1, e2 in zip(evals(tmp_path / "one"), evals(tmp_path / "ep")):
        assert abs(e1["loss"] - e2["loss"]) <= 1e-5, (e1, e2)
    _close(_weights(tmp_path / "one"), _weights(tmp_path / "ep"))  # the parameters after 5 steps
    # the checkpoint of step 3 (DDP: one file, the experts gathered; FSDP2: each rank's experts, replicated
    # over the two groups) resumes exactly, each rank with its share again
    ck = next((tmp_path / "ep" / "checkpoints").glob("step_000003*"))
    assert is_sharded_checkpoint(ck) == (parallel == "fsdp")
    resumed = torchrun("train.py", "--resume-from", ck, "--out-dir", tmp_path / "resumed", nproc=nproc)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert losses(tmp_path / "resumed") == b[3:]


def test_under_a_capacity_limit_the_same_tokens_are_dropped_as_without_it(corpus_dir, tmp_path):
    steps = ["--max-steps", "4", "--num-experts", "4", "--capacity-factor", "1.0", "--no-compile"]
    runs = {}
    for name, extra in (("ddp", []), ("ep", ["--expert-parallel", "2"])):
        r = torchrun("train.py", *common(corpus_dir, tmp_path, 4), *steps, "--out-dir", tmp_path / name, *extra)
        assert r.returncode == 0, r.stderr[-3000:]
        runs[name] = [rec for rec in read_metrics(tmp_path / name) if rec["kind"] == "train"]
    dropped = [[rec["dropped_fraction"] for rec in runs[n]] for n in ("ddp", "ep")]
    assert dropped[0] == dropped[1] and max(dropped[0]) > 0, dropped
    assert max(abs(x["loss"] - y["loss"]) for x, y in zip(*runs.values())) <= 1e-5


def test_expert_parallel_refusals_are_one_line(corpus_dir, tmp_path):
    r = single(*common(corpus_dir, tmp_path, 4), "--max-steps", "2", "--expert-parallel", "2",
               "--out-dir", tmp_path / "run")
    assert r.returncode == 2 and "expert-parallel" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = torchrun("train.py", *common(corpus_dir, tmp_path, 4), "--max-steps", "2", "--num-experts", "3",
                 "--top-k", "1", "--expert-parallel", "2", "--out-dir", tmp_path / "odd")
    # every rank leaves with 2 and the one-line reason (torchrun itself then exits 1)
    assert r.returncode != 0 and "exitcode: 2" in r.stderr and "must divide --num-experts (3)" in r.stderr, r.stderr


def _two_nodes(args: list, port: int, timeout: float = 300):
    """Two torchrun agents on this machine, a process each, meeting by c10d rendezvous on 127.0.0.1: the
    launch of a two-node job. Each agent runs in its own process group, killed whole whatever happens."""
    import signal
    import subprocess

    from helpers import ROOT, _kill_group, cli_env

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
           "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "blueberry-test",
           "train.py", *map(str, args)]
    agents = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env(),
                               cwd=ROOT, start_new_session=True) for _ in range(2)]
    try:
        return [a.communicate(timeout=timeout) + (a.returncode,) for a in agents]
    finally:
        for a in agents:
            _kill_group(a.pid, signal.SIGKILL)


def test_a_two_node_fsdp2_expert_parallel_job_resumes_exactly_on_one_node_and_on_one_process(corpus_dir, tmp_path):
    from helpers import free_port

    args = [*common(corpus_dir, tmp_path, 4), "--max-steps", "8", "--num-experts", "4", "--no-compile",
            "--expert-parallel", "2", "--parallel", "fsdp"]
    nodes = _two_nodes([*args, "--out-dir", tmp_path / "nodes"], free_port())
    assert all(rc == 0 for _, _, rc in nodes), [err[-2000:] for _, err, _ in nodes]
    ck = tmp_path / "nodes" / "checkpoints" / "step_000005.dcp"
    assert is_sharded_checkpoint(ck)
    # each rank wrote its own two experts of each layer: two pieces per expert tensor, no gathered copy
    stored = SafeReader(ck).read_metadata().state_dict_metadata
    experts = {k: v for k, v in stored.items() if ".w_up" in k or ".w_down" in k}  # weights and optimizer states
    assert {k.split(".")[0] for k, v in experts.items() if len(v.size) == 3} == {"model", "optim"}, experts
    assert all(sorted(c.offsets[0] for c in v.chunks) == [0, 2] and v.size[0] == 4
               for k, v in experts.items() if len(v.size) == 3), experts
    one_node = torchrun("train.py", "--resume-from", ck, "--out-dir", tmp_path / "one_node", nproc=2)
    assert one_node.returncode == 0, one_node.stderr[-3000:]
    assert losses(tmp_path / "one_node") == losses(tmp_path / "nodes")[5:]
    assert all(torch.equal(a, b) for a, b in zip(_weights(tmp_path / "nodes").values(),
                                                 _weights(tmp_path / "one_node").values()))
    alone = single("--resume-from", ck, "--out-dir", tmp_path / "alone", "--batch-size", "8", "--expert-parallel", "1")
    assert alone.returncode == 0, alone.stderr[-3000:]
    assert max(abs(x - y) for x, y in zip(losses(tmp_path / "alone"), losses(tmp_path / "nodes")[5:])) <= 1e-5
