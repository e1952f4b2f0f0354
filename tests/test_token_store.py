"""Data at scale: `blueberry prepare` writes sharded token stores (parallel, resumable, mergeable), cache
hits come from the manifest, the sharded loader resumes exactly, and mixtures sample in proportion.

Checked against what the store must hold independently of how it is built: every source document once,
tokenized as the tokenizer tokenizes it alone; the same bytes whatever the worker count or interruption."""

import json
import os
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from blueberry.data import prepare as prepare_module
from blueberry.data.prepare import PrepareSettings, prepare
from blueberry.data.sharded_loader import MixtureLoader, Prefetched, ShardedLoader, packed_windows
from blueberry.data.token_store import has_split, merge_stores, open_split, read_manifest
from blueberry.data.tokenizer import load_tokenizer

from conftest import make_text
from helpers import TINY_FLAGS, run_cli



def write_corpus(root: Path, files: int = 4, docs_per_file: int = 60, seed: int = 0) -> list[str]:
    """JSONL files of word-salad documents; returns every text in source order."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    texts = []
    for f in range(files):
        with open(root / f"part{f:02d}.jsonl", "w") as fh:
            for _ in range(docs_per_file):
                text = make_text(rng, rng.randint(1, 6))
                texts.append(text)
                fh.write(json.dumps({"text": text}) + "\n")
    return texts


def settings(source, **kw) -> PrepareSettings:
    return PrepareSettings(str(source), **{"vocab_size": 300, "shard_tokens": 3000, "workers": 1, **kw})


def stored_documents(store: Path) -> dict[str, list[list[int]]]:
    """Each split's documents as token lists (end-of-text dropped), in store order."""
    out = {}
    for split in ("train", "val", "test"):
        if split == "test" and not has_split(store, "test"):
            continue
        docs = []
        for shard in open_split(store, split):
            bounds = list(shard.doc_starts) + [len(shard.tokens)]
            docs += [list(map(int, shard.tokens[a + 1:b])) for a, b in zip(bounds[:-1], bounds[1:])]
        out[split] = docs
    return out


def store_bytes(store: Path) -> list[bytes]:
    return [p.read_bytes() for p in sorted(store.glob("shard-*/*"))]


def test_prepare_holds_every_document_once_tokenized_alone(tmp_path):
    texts = write_corpus(tmp_path / "src")
    manifest = prepare(settings(tmp_path / "src"), tmp_path / "store")
    assert manifest["complete"] and len(manifest["shards"]) > 3  # several shards
    tok = load_tokenizer(str(tmp_path / "store" / "tokenizer.json"))
    stored = stored_documents(tmp_path / "store")
    expected = Counter(tuple(tok.encode(t)) for t in texts)
    assert Counter(map(tuple, stored["train"] + stored["val"])) == expected
    n_val = len(stored["val"])
    assert 0.04 * len(texts) < n_val < 0.2 * len(texts)  # about --val-fraction 0.1 of 240 documents


def test_the_split_is_stable_as_the_corpus_grows_and_duplicates_stay_together(tmp_path):
    write_corpus(tmp_path / "small", files=2)
    write_corpus(tmp_path / "big", files=4)  # the same first two files, then two more
    tok = tmp_path / "tok.json"
    prepare(settings(tmp_path / "small"), tmp_path / "s1")
    (tmp_path / "s1" / "tokenizer.json").rename(tok)
    prepare(settings(tmp_path / "small", tokenizer=str(tok)), tmp_path / "s1b")
    prepare(settings(tmp_path / "big", tokenizer=str(tok)), tmp_path / "s2")
    small, big = stored_documents(tmp_path / "s1b"), stored_documents(tmp_path / "s2")
    assert set(map(tuple, small["val"])) <= set(map(tuple, big["val"]))
    assert set(map(tuple, small["train"])) <= set(map(tuple, big["train"]))
    assert not set(map(tuple, big["train"])) & set(map(tuple, big["val"]))  # no text on both sides


def test_two_workers_write_the_same_bytes_as_one(tmp_path):
    write_corpus(tmp_path / "src")
    prepare(settings(tmp_path / "src"), tmp_path / "one")
    tok = str(tmp_path / "one" / "tokenizer.json")
    prepare(settings(tmp_path / "src", tokenizer=tok), tmp_path / "a")
    prepare(settings(tmp_path / "src", tokenizer=tok, workers=2), tmp_path / "b")
    assert store_bytes(tmp_path / "a") == store_bytes(tmp_path / "b")


def test_an_interrupted_prepare_resumes_after_its_last_complete_shard(tmp_path, monkeypatch, capsys):
    write_corpus(tmp_path / "src")
    prepare(settings(tmp_path / "src"), tmp_path / "clean")
    real = prepare_module.iter_documents

    def dies_after(n):
        def docs(*a, **k):
            for i, d in enumerate(real(*a, **k)):
                if i == n:
                    raise KeyboardInterrupt  # as a Ctrl-C (or a kill) would stop it
                yield d
        return docs

    tok = str(tmp_path / "clean" / "tokenizer.json")
    monkeypatch.setattr(prepare_module, "BATCH_DOCUMENTS", 16)  # small batches: some shards seal before the stop
    monkeypatch.setattr(prepare_module, "iter_documents", dies_after(150))
    with pytest.raises(KeyboardInterrupt):
        prepare(settings(tmp_path / "src", tokenizer=tok), tmp_path / "store")
    partial = read_manifest(tmp_path / "store")
    assert not partial["complete"] and partial["shards"] and 0 < partial["documents"] < 150
    assert not list((tmp_path / "store").glob(".shard-*"))  # the shard being written was removed
    monkeypatch.setattr(prepare_module, "iter_documents", real)
    capsys.readouterr()
    prepare(settings(tmp_path / "src", tokenizer=tok), tmp_path / "store")
    assert any(line.startswith("Resuming") for line in capsys.readouterr().out.splitlines())
    assert store_bytes(tmp_path / "store") == store_bytes(tmp_path / "clean")


def test_a_cache_hit_reads_no_document_and_a_changed_file_is_caught(tmp_path, monkeypatch):
    write_corpus(tmp_path / "src")
    prepare(settings(tmp_path / "src"), tmp_path / "store")

    def forbidden(*a, **k):
        raise AssertionError("a cache hit must not read the documents")

    monkeypatch.setattr(prepare_module, "iter_documents", forbidden)
    prepare(settings(tmp_path / "src"), tmp_path / "store")
    f = tmp_path / "src" / "part01.jsonl"
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))  # touched, not changed: still a hit
    prepare(settings(tmp_path / "src"), tmp_path / "store")
    data = f.read_bytes()
    f.write_bytes(data.replace(b"king", b"sing", 1))  # same size, other content
    with pytest.raises(AssertionError, match="must not read"):
        prepare(settings(tmp_path / "src"), tmp_path / "store")


def test_two_machines_prepare_parts_that_merge_into_one_store(tmp_path):
    texts = write_corpus(tmp_path / "src", files=5)
    prepare(settings(tmp_path / "src"), tmp_path / "whole")
    tok = str(tmp_path / "whole" / "tokenizer.json")
    for i in range(2):
        prepare(settings(tmp_path / "src", tokenizer=tok, shard_index=i, num_shards=2), tmp_path / f"p{i}")
    merge_stores(tmp_path / "merged", [tmp_path / "p1", tmp_path / "p0"])
    merged = stored_documents(tmp_path / "merged")
    whole = stored_documents(tmp_path / "whole")
    assert Counter(map(tuple, merged["train"])) == Counter(map(tuple, whole["train"]))
    assert Counter(map(tuple, merged["val"])) == Counter(map(tuple, whole["val"]))
    assert len(merged["train"]) + len(merged["val"]) == len(texts)
    bad = run_cli("prepare", "--merge", tmp_path / "m2", tmp_path / "p0")
    assert bad.returncode == 2 and "give each of 0..1 exactly once" in bad.stderr


def test_a_stream_is_read_to_the_end_without_a_hidden_cap(tmp_path, monkeypatch):
    import datasets

    records = [{"text": f"document number {i} " * 3} for i in range(25_000)]
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: iter(records))
    from blueberry.data.sources import iter_documents

    assert sum(1 for _ in iter_documents("hf:somebody/corpus")) == 25_000


# ---- the loader ----
def test_ranks_read_disjoint_windows_that_cover_the_store(tmp_path):
    write_corpus(tmp_path / "src")
    prepare(settings(tmp_path / "src"), tmp_path / "store")
    shards = open_split(tmp_path / "store", "train")
    loaders = [ShardedLoader(packed_windows(shards, 16), 4, seed=3, rank=r, world_size=2) for r in range(2)]
    seen = [set(), set()]
    for r, loader in enumerate(loaders):
        for _ in range(loader.batches_per_epoch):
            for row in loader.next_batch()[0]:
                seen[r].add(tuple(row.tolist()))
    assert not seen[0] & seen[1]
    assert len(seen[0] | seen[1]) >= 0.9 * loaders[0].num_windows


@pytest.mark.parametrize("prefetch", [0, 3])
def test_the_loader_resumes_exactly_across_shards_and_epochs(tmp_path, prefetch):
    write_corpus(tmp_path / "src")
    prepare(settings(tmp_path / "src"), tmp_path / "store")
    shards = open_split(tmp_path / "store", "train")
    assert len(shards) > 3

    def make():
        loader = ShardedLoader(packed_windows(shards, 16, document_mask=True), 8, seed=1)
        return Prefetched(loader, prefetch) if prefetch else loader

    full = make()
    n = full.batches_per_epoch + 7  # into the second epoch, through every shard
    batches = [full.next_batch() for _ in range(n)]
    first = make()
    for _ in range(n // 2):
        first.next_batch()
    state = first.state_dict()
    again = make()
    again.load_state_dict(state)
    for b in batches[n // 2:]:
        got = again.next_batch()
        assert all(torch.equal(x, y) for x, y in zip(got, b))
    for loader in (full, first, again):
        getattr(loader, "stop", lambda: None)()


def test_a_mixture_samples_in_proportion_and_resumes_exactly(tmp_path):
    write_corpus(tmp_path / "a", seed=1)
    write_corpus(tmp_path / "b", seed=2)
    prepare(settings(tmp_path / "a"), tmp_path / "sa")
    tok = str(tmp_path / "sa" / "tokenizer.json")
    prepare(settings(tmp_path / "b", tokenizer=tok), tmp_path / "sb")

    def make():
        parts = {"a": ShardedLoader(packed_windows(open_split(tmp_path / "sa", "train"), 16), 1, seed=0),
                 "b": ShardedLoader(packed_windows(open_split(tmp_path / "sb", "train"), 16), 1, seed=1)}
        return MixtureLoader(parts, {"a": 0.8, "b": 0.2}, batch_size=10, seed=5)

    mix = make()
    batches = [mix.next_batch() for _ in range(200)]
    share = mix.tokens_by_source["a"] / (mix.tokens_by_source["a"] + mix.tokens_by_source["b"])
    assert abs(share - 0.8) < 0.05  # 2,000 draws: 4 standard deviations is 0.036
    resumed = make()
    half = make()
    for _ in range(100):
        half.next_batch()
    resumed.load_state_dict(half.state_dict())
    for b in batches[100:]:
        assert all(torch.equal(x, y) for x, y in zip(resumed.next_batch(), b))


# ---- training on stores ----
def test_training_on_a_mixture_logs_tokens_per_source_and_resumes_bitwise(tmp_path, tiny):
    from blueberry.runs.checkpoint import read_state, resolve_checkpoint
    from blueberry.runs.layout import read_metrics
    from blueberry.training.run import run_training

    write_corpus(tmp_path / "a", seed=1)
    write_corpus(tmp_path / "b", seed=2)
    cfg = tiny(dataset=f"{tmp_path / 'a'}:0.7,{tmp_path / 'b'}:0.3", shard_tokens=3000, max_steps=8,
               checkpoint_every=4, eval_every=4, prepare_workers=1)
    run_training(cfg)
    train = [r for r in read_metrics(cfg.out_dir) if r["kind"] == "train"]
    assert train[-1][f"tokens/{tmp_path / 'a'}"] + train[-1][f"tokens/{tmp_path / 'b'}"] == 8 * 4 * 32
    assert all(r["data_time"] >= 0 and 0 < r["optimizer_share"] < 1 for r in train)
    ckpt = resolve_checkpoint(Path(cfg.out_dir) / "checkpoints" / "step_000004")
    resumed = cfg.replace(out_dir=str(tmp_path / "resumed"))
    run_training(resumed, resume_state=read_state(ckpt), resume_checkpoint=ckpt)
    again = [r["loss"] for r in read_metrics(resumed.out_dir) if r["kind"] == "train"]
    assert again == [r["loss"] for r in train][4:]


def test_a_test_fraction_holds_documents_out_of_both_other_splits_and_leaves_validation_as_it_was(tmp_path):
    texts = write_corpus(tmp_path / "src")
    prepare(settings(tmp_path / "src"), tmp_path / "plain")
    prepare(settings(tmp_path / "src", test_fraction=0.2), tmp_path / "with_test")
    def decoded(store):
        tokenizer = load_tokenizer(str(store / "tokenizer.json"))
        return {k: [tokenizer.decode(d) for d in docs] for k, docs in stored_documents(store).items()}

    plain, split = decoded(tmp_path / "plain"), decoded(tmp_path / "with_test")
    assert "test" not in plain and 0.1 < len(split["test"]) / len(texts) < 0.3
    assert split["val"] == plain["val"]  # the validation split does not move
    assert not set(split["test"]) & (set(split["train"]) | set(split["val"]))
    assert sorted(split["train"] + split["val"] + split["test"]) == sorted(texts)


def test_train_on_a_prepared_store_from_the_command_line(tmp_path, tiny):
    """A store prepared with a test split trains with document windows and document masks, scores its test
    split once at the end and is evaluated; a run asking a store without one for a test split is refused."""
    from blueberry.data import open_corpus
    from blueberry.errors import UsageError

    write_corpus(tmp_path / "src")
    r = run_cli("prepare", tmp_path / "src", "--out", tmp_path / "store", "--vocab-size", "300",
                "--shard-tokens", "3000", "--workers", "2", "--test-fraction", "0.1")
    assert r.returncode == 0, r.stderr[-2000:]
    t = run_cli("train", "--dataset", tmp_path / "store", *TINY_FLAGS, "--max-steps", "3", "--test-fraction", "0.1",
                "--dataset-type", "document", "--document-mask", "--out-dir", tmp_path / "run")
    assert t.returncode == 0, t.stderr[-2000:]
    assert "token store" in t.stdout + t.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    documents = sum(len(s.doc_starts) for s in open_split(tmp_path / "store", "test"))
    assert summary["test_documents"] == documents > 0 and 0 < summary["test_bits_per_byte"] < 20
    e = run_cli("eval", "--checkpoint", tmp_path / "run")  # the store's validation split
    assert e.returncode == 0 and "bits_per_byte" in e.stdout, e.stderr[-2000:]
    prepare(settings(tmp_path / "src"), tmp_path / "no_test")
    with pytest.raises(UsageError, match="without a test split"):
        open_corpus(tiny(dataset=str(tmp_path / "no_test"), test_fraction=0.1))
    missing = run_cli("prepare", tmp_path / "nope", "--out", tmp_path / "s2")
    assert missing.returncode == 2 and "does not exist" in missing.stderr and "Traceback" not in missing.stderr


def test_a_store_loader_batch_matches_the_tokens_on_disk(tmp_path):
    """Independent of the loader: window w of shard s is tokens[w*L : w*L+L+1] of that shard's file."""
    write_corpus(tmp_path / "src")
    prepare(settings(tmp_path / "src"), tmp_path / "store")
    shards = open_split(tmp_path / "store", "train")
    loader = ShardedLoader(packed_windows(shards, 16), 4, shuffle=False)
    x, y = next(iter(loader))
    raw = np.fromfile(tmp_path / "store" / "shard-00000" / "train.bin", dtype=np.uint16).astype(np.int64)
    for w in range(4):
        assert x[w].tolist() == raw[w * 16:w * 16 + 16].tolist()
        assert y[w].tolist() == raw[w * 16 + 1:w * 16 + 17].tolist()
