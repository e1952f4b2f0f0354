"""Sharded checkpoints (DCP) and resumes on another world size.

In process: the loaders' state is global, so N ranks stopped and M ranks resumed see exactly the windows of
an uninterrupted run (none twice, none skipped); a sharded checkpoint round-trips, commits atomically and
refuses a pickle that would run code; resumes that cannot be re-partitioned are refused in one line.
Under torchrun (gloo): an FSDP2 run of 2 processes resumes on 1 and on 4, and a 1-process checkpoint of it on 2
FSDP2 processes, each equal to the uninterrupted run (the 2 -> 2 resume, exact to the bit, is
test_distributed.py's test_two_process_resume_continues_exactly[fsdp]); export, generate, eval's loader and
--init-from read the sharded checkpoint in one process."""

import os
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from blueberry.data.sharded_loader import ShardedLoader, packed_windows
from blueberry.data.token_store import Shard
from blueberry.errors import CheckpointError
from blueberry.models import create_model
from blueberry.runs.checkpoint import (POINTER, clean_stale_temporaries, is_sharded_checkpoint, load_weights,
                                           read_state, resolve_checkpoint)
from blueberry.training.distributed import DistContext
from blueberry.runs.layout import read_metrics

GLOBAL_BATCH = 12  # windows per step, whatever the world size (1 x 12, 2 x 6, 3 x 4, 4 x 3)


class IndexDataset:
    """Sample i is the window numbered i (one shard held in memory)."""

    seq_len = 1

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return (np.array([i]),)

    def set_epoch(self, epoch: int) -> None:
        pass


def batch_loaders(world: int, per_rank: int) -> list:
    return [ShardedLoader([IndexDataset(101)], per_rank, seed=3, rank=r, world_size=world) for r in range(world)]


def sharded_loaders(world: int, per_rank: int) -> list:
    """Three shards of unique tokens (window = its first token), 10 + 7 + 13 windows of 4 + 1 tokens."""
    starts, sizes = (0, 1000, 2000), (41, 29, 53)
    shards = [Shard(np.arange(a, a + n, dtype=np.int64), np.array([0])) for i, (a, n) in
              enumerate(zip(starts, sizes))]
    return [ShardedLoader(packed_windows(shards, 4), per_rank, seed=3, rank=r, world_size=world) for r in range(world)]


def take(loaders: list, steps: int) -> list[tuple[int, int]]:
    """(epoch, window) of every sample the ranks read together in `steps` steps."""
    seen = []
    for _ in range(steps):
        for loader in loaders:
            seen += [(loader.epoch, int(w)) for w in loader.next_batch()[0][:, 0]]
    return seen


@pytest.mark.parametrize("make", [batch_loaders, sharded_loaders], ids=["batch", "sharded"])
@pytest.mark.parametrize("before,after", [(1, 2), (2, 1), (2, 4), (4, 2), (2, 3)])
def test_a_resume_on_another_world_size_sees_the_windows_of_the_uninterrupted_run(make, before, after):
    """Across an epoch's end too (10 steps: more than one epoch of either loader)."""
    uninterrupted = take(make(before, GLOBAL_BATCH // before), 10)
    first = make(before, GLOBAL_BATCH // before)
    seen = take(first, 4)
    resumed = make(after, GLOBAL_BATCH // after)
    for loader in resumed:
        loader.load_state_dict(first[0].state_dict())  # rank 0's state, as the checkpoint holds it
    seen += take(resumed, 6)
    assert sorted(seen) == sorted(uninterrupted)
    assert len(set(seen)) == len(seen)


@pytest.mark.parametrize("make", [batch_loaders, sharded_loaders], ids=["batch", "sharded"])
def test_with_the_per_rank_batch_kept_the_windows_are_still_a_prefix_of_the_order(make):
    """2 ranks of 3 for 3 steps, then 4 ranks of 3 for 2: the first 18 + 24 windows of the epoch, once each."""
    first = make(2, 3)
    seen = take(first, 3)
    resumed = make(4, 3)
    for loader in resumed:
        loader.load_state_dict(first[0].state_dict())
    seen += take(resumed, 2)
    assert sorted(seen) == sorted(take(make(1, 1), 42))


def test_an_old_per_rank_data_position_continues_on_its_own_world_size_only():
    old = {"epoch": 0, "position": 2, "seed": 3, "world_size": 2, "num_samples": 101}
    same = batch_loaders(2, 6)[0]
    same.load_state_dict(old)
    assert same.consumed == 24
    with pytest.raises(CheckpointError, match="resume it on 2, not 4"):
        batch_loaders(4, 3)[0].load_state_dict(old)


class _Tokenizer:
    identity = "bpe:300:test"


@pytest.mark.parametrize("data,why", [
    ({"batches": 3, "sources": {"a": {"world_size": 2}}}, "mixture draws each rank's rows apart"),
    ({"epoch": 0, "position": 3, "seed": 1, "world_size": 2}, "saved per rank"),
])
def test_a_resume_that_cannot_be_repartitioned_is_refused_in_one_line(tiny, data, why):
    from blueberry.training.run import check_resumable

    cfg = tiny(parallel="fsdp")
    state = {"tokenizer": _Tokenizer.identity, "world_size": 2, "parallel": "fsdp", "data": data}
    check_resumable(state, Path("ck"), _Tokenizer, DistContext(rank=0, world_size=2), cfg)  # same size: fine
    with pytest.raises(CheckpointError, match=f"cannot continue on 4: .*{why}.*same --nproc_per_node \\(2\\)"):
        check_resumable(state, Path("ck"), _Tokenizer, DistContext(rank=0, world_size=4), cfg)
    ok = {**state, "data": {"epoch": 0, "consumed": 24, "seed": 1, "world_size": 2}}
    check_resumable(ok, Path("ck"), _Tokenizer, DistContext(rank=0, world_size=4), cfg)


# ---------------------------------------------------------------- a sharded checkpoint in one process
def _trained(cfg, steps: int = 2):
    from blueberry.optimizers import setup_optimizers

    torch.manual_seed(0)
    model = create_model(cfg)
    optimizers = setup_optimizers(model, cfg)
    x = torch.randint(0, cfg.vocab_size, (2, cfg.max_seq_len))
    for _ in range(steps):
        model(x, x).loss.backward()
        for opt in optimizers:
            opt.step()
            opt.zero_grad()
    return model, optimizers


def _save(cfg, model, optimizers, step: int):
    from blueberry.training.sharded_checkpoint import ShardedCheckpointer

    saver = ShardedCheckpointer(cfg.out_dir, DistContext())
    state = {"config": cfg.to_dict(), "world_size": 1, "data": {}}
    return saver.save(step, model, optimizers, state, keep=2)


def test_a_sharded_checkpoint_round_trips_and_commits_atomically(tiny, monkeypatch):
    from blueberry.training import sharded_checkpoint
    from blueberry.runs.dcp_reader import load_sharded_optimizers

    cfg = tiny(model_type="standard")
    model, optimizers = _trained(cfg)
    ck = _save(cfg, model, optimizers, 2)
    assert ck.name == "step_000002.dcp" and is_sharded_checkpoint(ck)
    assert resolve_checkpoint(cfg.out_dir) == ck
    fresh, fresh_opts = _trained(cfg, steps=0)
    load_weights(ck, fresh)
    load_sharded_optimizers(ck, fresh, fresh_opts, read_state(ck)["optimizers"])
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
    for opt, other in zip(optimizers, fresh_opts):
        for p, q in zip([p for g in opt.param_groups for p in g["params"]],
                        [q for g in other.param_groups for q in g["params"]]):
            for key, value in opt.state[p].items():
                assert torch.equal(torch.as_tensor(value), torch.as_tensor(other.state[q][key])), key
        assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in other.param_groups]

    def killed(flat, storage_writer):  # a kill mid-write: one shard file written, no metadata
        (Path(storage_writer.fs.concat_path(storage_writer.path, "__0_0.distcp"))).write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(sharded_checkpoint.dcp, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        _save(cfg, model, optimizers, 4)
    root = Path(cfg.out_dir) / "checkpoints"
    assert (root / POINTER).read_text().strip() == "step_000002.dcp"
    assert resolve_checkpoint(cfg.out_dir) == ck and not (root / "step_000004.dcp").exists()
    clean_stale_temporaries(cfg.out_dir)
    assert sorted(p.name for p in root.iterdir()) == [POINTER, "step_000002.dcp"]


class Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"echo pwned > {self.marker}",))


def test_a_sharded_checkpoint_whose_metadata_would_run_code_is_refused(tiny, tmp_path):
    cfg = tiny(model_type="standard")
    model, optimizers = _trained(cfg, steps=1)
    ck = _save(cfg, model, optimizers, 1)
    marker = tmp_path / "pwned"
    (ck / ".metadata").write_bytes(pickle.dumps({"evil": Evil(marker)}))
    with pytest.raises(CheckpointError, match="refused"):
        load_weights(ck, create_model(cfg))
    assert not marker.exists()


def test_a_sharded_checkpoint_of_another_architecture_lists_the_tensors(tiny):
    cfg = tiny(model_type="standard")
    model, optimizers = _trained(cfg, steps=1)
    ck = _save(cfg, model, optimizers, 1)
    with pytest.raises(CheckpointError, match=r"different architecture: .*checkpoint \(32, 32\) vs model \(64, 64\)"):
        load_weights(ck, create_model(cfg.replace(d_model=64)))


# ---------------------------------------------------------------- torchrun: 2 -> 1, 2 -> 4, then 1 -> 2
@pytest.fixture(scope="module")
def resumed_runs(corpus_dir, tmp_path_factory):
    """An FSDP2 run of 2 processes (6 steps, checkpoints every 2, written in the background), resumed from
    step 2 on 1 process and on 4 (the per-rank batch scaled so that a step is the same 8 sequences), and the
    1-process run's single-file checkpoint of step 4 resumed on 2 FSDP2 processes."""
    from test_distributed import common, single, torchrun

    tmp = tmp_path_factory.mktemp("dcp")
    args = [*common(corpus_dir, tmp, 4), "--model-type", "standard", "--max-steps", "6", "--checkpoint-every", "2",
            "--eval-every", "6", "--parallel", "fsdp", "--no-compile", "--sample-tokens", "2", "--async-checkpoint"]
    runs = {}

    def check(name, r):
        assert r.returncode == 0, f"{name}: {r.stderr[-3000:]}"
        runs[name] = tmp / name

    check("full", torchrun("train.py", *args, "--out-dir", tmp / "full"))
    step2 = tmp / "full" / "checkpoints" / "step_000002.dcp"
    check("on1", single("--resume-from", step2, "--batch-size", "8", "--out-dir", tmp / "on1"))
    check("on4", torchrun("train.py", "--resume-from", step2, "--batch-size", "2", "--out-dir", tmp / "on4", nproc=4))
    one_file = tmp / "on1" / "checkpoints" / "step_000004"
    check("back_on2", torchrun("train.py", "--resume-from", one_file, "--batch-size", "4", "--out-dir",
                               tmp / "back_on2"))
    return runs


def _losses(run) -> list[float]:
    return [r["loss"] for r in read_metrics(run) if r["kind"] == "train"]


@pytest.mark.skipif(sys.platform != "linux", reason="gloo multi-process tests run on Linux")
@pytest.mark.parametrize("name,start,shards", [("on1", 2, 0), ("on4", 2, 4), ("back_on2", 4, 2)])
def test_a_resume_on_another_world_size_continues_the_run(resumed_runs, name, start, shards):
    full, run = resumed_runs["full"], resumed_runs[name]
    a, b = _losses(full)[start:], _losses(run)
    assert len(a) == len(b) == 6 - start
    assert max(abs(x - y) for x, y in zip(a, b)) <= 1e-4, (a, b)  # fp32 reductions in another order
    last = resolve_checkpoint(run)
    data, expected = read_state(last)["data"], read_state(resolve_checkpoint(full))["data"]
    assert (data["epoch"], data["consumed"]) == (expected["epoch"], expected["consumed"])  # the same windows
    assert is_sharded_checkpoint(last) == bool(shards)  # FSDP2 writes shards, one process one file set
    assert len(list(last.glob("__*_0.distcp"))) == shards


@pytest.mark.skipif(sys.platform != "linux", reason="gloo multi-process tests run on Linux")
def test_export_generate_eval_and_init_from_read_a_sharded_checkpoint(resumed_runs, tmp_path):
    from safetensors.torch import load_file

    from blueberry.cli.main import main
    from blueberry.runs.loading import load_model
    from blueberry.training.init_from import load_initial_weights, source_settings

    full = resumed_runs["full"]
    assert is_sharded_checkpoint(resolve_checkpoint(full))
    model, config, _, ck = load_model(full, "cpu")  # what generate, eval, export and serve call
    assert ck.name == "step_000006.dcp"
    assert main(["export", str(full), str(tmp_path / "hf")]) == 0
    exported = load_file(tmp_path / "hf" / "model.safetensors")
    assert torch.equal(exported["model.embed_tokens.weight"], model.state_dict()["embed.weight"])
    assert main(["generate", "--checkpoint", str(full), "--prompt", "the", "--max-new-tokens", "3",
                 "--temperature", "0"]) == 0
    assert source_settings(str(full))["d_model"] == 32
    other = create_model(config)
    load_initial_weights(other, str(full))
    for (key, a), b in zip(model.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), key
