import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from blueberry.data import (DocumentDataset, ShardedLoader, PackedDataset, RandomChunkDataset, TextTokenDataset,
                            create_dataloaders, create_dataset, iter_hf_dataset, load_and_cache_data,
                            load_documents, split_documents)
from blueberry.data.sources import markdown_to_text
from blueberry.errors import DataError



def test_builtin_corpora():
    plays = load_documents("shakespeare")
    assert len(plays) == 38
    assert "**" not in plays[0].text and "#" not in plays[0].text[:200]
    docs = load_documents("python-docs", num_documents=5)
    assert len(docs) == 5 and all(d.text.strip() for d in docs)


def test_markdown_stripping():
    md = "# Hamlet\n\n## ACT I\n\n_Enter GHOST_\n\n**HAMLET**  \nTo be, or not to be.  \n"
    assert markdown_to_text(md) == "Hamlet\n\nACT I\n\nEnter GHOST\n\nHAMLET\nTo be, or not to be.\n"


def test_local_formats(tmp_path):
    (tmp_path / "a.txt").write_text("first document\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "second"}) + "\n\n" + json.dumps({"text": "third"}) + "\n")
    pq.write_table(pa.table({"text": ["fourth", "fifth"], "id": [1, 2]}), tmp_path / "c.parquet")
    (tmp_path / "ignored.csv").write_text("x")
    docs = load_documents(str(tmp_path))
    assert [d.text.strip() for d in docs] == ["first document", "second", "third", "fourth", "fifth"]
    assert [d.text for d in load_documents(str(tmp_path / "b.jsonl"))] == ["second", "third"]


def test_custom_text_field(tmp_path):
    (tmp_path / "d.jsonl").write_text(json.dumps({"body": "hello"}) + "\n")
    assert load_documents(str(tmp_path / "d.jsonl"), text_field="body")[0].text == "hello"


def test_hf_datasets_path_on_local_files(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps({"text": f"record {i}"}) + "\n" for i in range(7)))
    docs = list(iter_hf_dataset("json", data_files=str(f), limit=5))
    assert [d.text for d in docs] == [f"record {i}" for i in range(5)]


def test_hf_hub_offline_message():
    with pytest.raises(DataError, match="local"):
        load_documents("hf:someone/not-a-real-dataset-xyz")


def test_split_is_by_whole_documents_and_seeded(corpus_dir):
    docs = load_documents(str(corpus_dir))
    train, val = split_documents(docs, 0.25, seed=3)
    assert len(val) == 3 and len(train) == 9
    assert not {d.name for d in train} & {d.name for d in val}
    again = split_documents(docs, 0.25, seed=3)
    assert [d.name for d in again[1]] == [d.name for d in val]
    assert [d.name for d in split_documents(docs, 0.25, seed=4)[1]] != [d.name for d in val]


def test_no_validation_sequence_appears_in_training(tiny):
    cfg = tiny(max_seq_len=16)
    _, _, corpus = load_and_cache_data(cfg)
    train = np.asarray(corpus.train)
    windows = {tuple(train[i:i + 16]) for i in range(len(train) - 16)}
    val = np.asarray(corpus.val)
    overlaps = sum(tuple(val[i:i + 16]) in windows for i in range(0, len(val) - 16))
    assert overlaps == 0


def test_cache_hit_and_rebuilds(tiny, capsys):
    cfg = tiny()
    load_and_cache_data(cfg)
    assert "cache hit" not in capsys.readouterr().out
    _, _, c1 = load_and_cache_data(cfg)
    assert "cache hit" in capsys.readouterr().out
    for change in (dict(max_tokens=3000), dict(num_documents=10), dict(val_fraction=0.2), dict(split_seed=9),
                   dict(vocab_size=320)):
        load_and_cache_data(tiny(**change))
        assert "cache hit" not in capsys.readouterr().out, change


def test_cache_rebuilds_when_content_changes(tmp_path, corpus_dir, capsys):
    import shutil

    from conftest import tiny_config

    data = tmp_path / "data"
    shutil.copytree(corpus_dir, data)
    cfg = tiny_config(tmp_path, data)
    _, _, c1 = load_and_cache_data(cfg)
    (data / "doc00.txt").write_text("completely new words in this file\n" * 50)
    capsys.readouterr()
    _, _, c2 = load_and_cache_data(cfg)
    assert "cache hit" not in capsys.readouterr().out
    assert c1.meta["key"] != c2.meta["key"]


def test_corrupted_cache_is_rebuilt_with_warning(tiny):
    cfg = tiny()
    _, _, c1 = load_and_cache_data(cfg)
    original = np.array(c1.train)
    entry = __import__("pathlib").Path(cfg.cache_dir) / c1.meta["key"]
    train_bin = entry / "shard-00000" / "train.bin"  # the cache entry is a token store of one shard
    data = bytearray(train_bin.read_bytes())
    data[10] ^= 0xFF
    train_bin.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="rebuilding"):
        _, _, c2 = load_and_cache_data(cfg)
    assert np.array_equal(original, np.asarray(c2.train))  # rebuilt to the same tokens
    with open(train_bin, "r+b") as f:  # truncated
        f.truncate(100)
    with pytest.warns(UserWarning, match="rebuilding"):
        _, _, c3 = load_and_cache_data(cfg)
    assert len(c3.train) == c3.meta["n_train"]


def test_num_documents_and_max_tokens_are_exact(tiny):
    cfg = tiny(num_documents=8, max_tokens=5000, val_fraction=0.25)
    _, _, corpus = load_and_cache_data(cfg)
    assert len(corpus.train) + len(corpus.val) == 5000
    assert len(corpus.val) == 1250
    assert corpus.meta["n_train_documents"] + corpus.meta["n_val_documents"] <= 8


def test_tokens_are_uint16_memmaps_with_eot_between_documents(tiny):
    _, tok, corpus = load_and_cache_data(tiny())
    assert isinstance(corpus.train, np.memmap) and corpus.train.dtype == np.uint16
    starts = corpus.train_doc_starts
    assert all(corpus.train[s] == tok.eot_id for s in starts)
    assert corpus.val_bytes > 0 and corpus.token_bytes[tok.eot_id] == 0


def test_dataset_types_shapes_and_boundaries():
    tokens = np.arange(1000, dtype=np.uint16)
    tt = TextTokenDataset(tokens, 10, stride=3)
    x, y = tt[2]
    assert np.array_equal(x, np.arange(6, 16)) and np.array_equal(y, np.arange(7, 17))
    assert len(tt) == len(range(0, 990, 3))
    packed = PackedDataset(tokens, 10)
    assert len(packed) == 99 and np.array_equal(packed[1][0], np.arange(10, 20))
    rc = RandomChunkDataset(tokens, 10, num_samples=50, seed=1)
    a = [rc[i][0][0] for i in range(50)]
    rc.set_epoch(1)
    b = [rc[i][0][0] for i in range(50)]
    assert a != b and all(np.array_equal(rc[i][1], rc[i][0] + 1) for i in range(5))
    starts = np.array([0, 25, 400, 900])
    doc = DocumentDataset(tokens, 10, starts, return_doc_ids=True)
    assert set(doc.starts[:4]) == {0, 10, 20, 25} and 400 in doc.starts
    x, y, ids = doc[list(doc.starts).index(20)]
    assert np.array_equal(ids, [0] * 5 + [1] * 5)
    with pytest.raises(DataError, match="too small"):
        PackedDataset(tokens[:5], 10)
    for kind in ("text_token", "packed", "random_chunk", "document"):
        ds = create_dataset(tokens, kind, 10, doc_starts=starts)
        assert ds[0][0].shape == (10,)


def test_sampler_resume_is_exact():
    ds = PackedDataset(np.arange(5000, dtype=np.uint16), 10)
    a = ShardedLoader([ds], 8, seed=3)
    for _ in range(70):  # crosses an epoch boundary (62 batches per epoch)
        a.next_batch()
    state = a.state_dict()
    expected = [a.next_batch()[0] for _ in range(5)]
    b = ShardedLoader([ds], 8, seed=3)
    b.load_state_dict(state)
    assert all(torch.equal(e, b.next_batch()[0]) for e in expected)


def test_ranks_read_disjoint_samples():
    ds = PackedDataset(np.arange(2000, dtype=np.uint16), 10)
    r0, r1 = ShardedLoader([ds], 4, seed=1, rank=0, world_size=2), ShardedLoader([ds], 4, seed=1, rank=1, world_size=2)
    seen0 = {int(x[0]) for _ in range(10) for x in r0.next_batch()[0]}
    seen1 = {int(x[0]) for _ in range(10) for x in r1.next_batch()[0]}
    assert not seen0 & seen1


def test_dataloaders_and_document_mask(tiny):
    cfg = tiny(dataset_type="document", document_mask=True)
    _, _, corpus = load_and_cache_data(cfg)
    train, val = create_dataloaders(cfg, corpus)
    batch = train.next_batch()
    assert len(batch) == 3 and batch[2].shape == batch[0].shape
    assert len(list(val)) == min(cfg.eval_batches, len(val))


def test_external_tokenizer_file(tiny, tmp_path):
    from blueberry.data import train_bpe

    tok = train_bpe(["alpha beta gamma delta " * 50], 280)
    tok.save(tmp_path / "tok.json")
    _, loaded, corpus = load_and_cache_data(tiny(tokenizer=str(tmp_path / "tok.json")))
    assert loaded.vocab_size == tok.vocab_size and loaded.identity.startswith("file:")


def test_bad_tokenizer_message(tiny, tmp_path):
    with pytest.raises(DataError, match="cannot be loaded offline"):
        load_and_cache_data(tiny(tokenizer=str(tmp_path / "nowhere")))


def test_the_test_split_is_held_out_of_training_and_validation_and_scored_at_the_end(tiny, corpus_dir):
    import json
    from pathlib import Path

    from blueberry.data.corpus import run_documents, split_documents, test_documents
    from blueberry.training.run import run_training

    cfg = tiny(test_fraction=0.2, max_steps=2)
    docs = run_documents(cfg)
    train, val = split_documents(docs, cfg.val_fraction, cfg.split_seed, cfg.test_fraction)
    test = test_documents(docs, cfg.val_fraction, cfg.split_seed, cfg.test_fraction)
    names = lambda ds: {d.name for d in ds}  # noqa: E731
    assert test and not names(test) & (names(train) | names(val))
    assert names(train) | names(val) | names(test) == names(docs)
    assert val == split_documents(docs, cfg.val_fraction, cfg.split_seed)[1]  # validation does not move
    run_training(cfg)
    summary = json.loads((Path(cfg.out_dir) / "summary.json").read_text())
    assert summary["test_documents"] == len(test) and 0 < summary["test_bits_per_byte"] < 20


@pytest.mark.parametrize("kind", ["packed", "random_chunk", "document"])
@pytest.mark.parametrize("store", [False, True], ids=["cached", "token-store"])
def test_every_corpus_is_read_by_one_loader_whose_document_ids_follow_the_end_of_text_tokens(tiny, kind, store):
    """One data path: a small corpus (one shard in the cache) and a prepared token store give the same kind of
    loader and loader state, every --dataset-type cuts windows from either, and with --document-mask each
    window's document id steps up exactly where the window holds an end-of-text token (documents begin with
    one), read from the tokens themselves."""
    from blueberry.data import open_corpus

    cfg = tiny(dataset_type=kind, document_mask=True, token_store=store, shard_tokens=4000, prepare_workers=1)
    tokenizer, corpus = open_corpus(cfg)
    train, val = create_dataloaders(cfg, corpus)
    assert isinstance(train.loader, ShardedLoader)
    assert set(train.state_dict()) == {"epoch", "consumed", "position", "seed", "world_size", "num_samples", "order"}
    boundaries = 0
    for x, _, ids in [train.next_batch() for _ in range(train.batches_per_epoch)] + list(val):
        steps = (ids[:, 1:] - ids[:, :-1]).tolist()
        assert steps == (x[:, 1:] == tokenizer.eot_id).long().tolist()
        boundaries += sum(map(sum, steps))
    assert boundaries > 0
    train.stop()


def test_a_data_position_saved_before_the_one_loader_resumes_with_a_warning(caplog):
    """Small corpora had their own loader and window order before the one data path: such a checkpoint's
    position is taken as a count of windows, and the run says the order is new."""
    ds = PackedDataset(np.arange(2000, dtype=np.uint16), 10)
    state = ShardedLoader([ds], 4, seed=1).state_dict()
    current = ShardedLoader([ds], 4, seed=1)
    with caplog.at_level("WARNING"):
        current.load_state_dict(state)
    assert "earlier version" not in caplog.text
    del state["order"]
    with caplog.at_level("WARNING"):
        current.load_state_dict(state)
    assert "earlier version" in caplog.text and current.consumed == state["consumed"]
