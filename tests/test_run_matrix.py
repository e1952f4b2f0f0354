"""Every verb on every kind of run: a plain pretraining run, a fine-tuning (SFT) run, an imported transformers
model, a run trained on a prepared token store, one on a mixture of two sources, an ensemble, and a
quantized run. Runs are tiny and made once per module; the verbs run in this process (as the command line
runs them: `blueberry.cli.main.main`), and each must succeed, or refuse in one line where it is refused by
design (exporting a quantized run)."""

from __future__ import annotations

import io
import json

import pytest

from helpers import TINY_FLAGS

KINDS = ("plain", "sft", "imported", "store", "mixture", "ensemble", "quantized")
VERBS = ("generate", "chat", "eval", "quantize", "export", "serve")
REFUSED = {("quantized", "export"): "quantized run", ("quantized", "quantize"): "already quantized",
           ("ensemble", "export"): "an ensemble of 2 runs"}  # refused by design, in one line


def _cli(*args) -> None:
    """One command, in this process (a subprocess would start Python and torch again)."""
    from blueberry.cli.main import main

    assert main([str(a) for a in args]) == 0, args


def _train(*args) -> None:
    _cli(*args, "--max-steps", "3", "--eval-every", "3", "--no-compile", *TINY_FLAGS)


@pytest.fixture(scope="module")
def runs(corpus_dir, tmp_path_factory):
    from test_import import save_family
    from test_sft import chats

    root = tmp_path_factory.mktemp("matrix")
    cache = ["--cache-dir", root / "cache"]
    _train("--dataset", corpus_dir, *cache, "--out-dir", root / "plain")
    (root / "chats.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats(60)))
    _train("--task", "sft", "--dataset", root / "chats.jsonl", *cache, "--out-dir", root / "sft")
    save_family("llama", root / "hf")
    _cli("import", root / "hf", root / "imported", "--seq-len", "32")
    _cli("prepare", corpus_dir, "--out", root / "store", "--vocab-size", "300", "--workers", "1")
    _train("--dataset", root / "store", *cache, "--out-dir", root / "store-run")
    half = root / "half"
    half.mkdir()
    for doc in sorted(corpus_dir.glob("*.txt"))[:6]:
        (half / doc.name).write_text(doc.read_text())
    _train("--dataset", f"{corpus_dir}:0.7,{half}:0.3", *cache, "--out-dir", root / "mixture")
    _train("--dataset", corpus_dir, *cache, "--out-dir", root / "ensemble", "--ensemble", "2")
    _cli("quantize", root / "plain", root / "quantized", "--eval-batches", "2", "--device", "cpu")
    return {"plain": root / "plain", "sft": root / "sft", "imported": root / "imported",
            "store": root / "store-run", "mixture": root / "mixture", "ensemble": root / "ensemble",
            "quantized": root / "quantized"}


def _serve(run) -> int:
    from fastapi.testclient import TestClient

    from blueberry.inference import Engine
    from blueberry.runs.loading import load_model
    from blueberry.inference.server import create_app

    model, _, tok, _ = load_model(run, "cpu")
    with TestClient(create_app(Engine(model, tok, slots=2), "m")) as client:
        r = client.post("/v1/completions", json={"model": "m", "prompt": "the king", "max_tokens": 3})
        assert r.status_code == 200, r.text
        c = client.post("/v1/chat/completions", json={"model": "m", "max_tokens": 3,
                                                      "messages": [{"role": "user", "content": "hi"}]})
        assert c.status_code == 200, c.text
    return 0


def _argv(verb, run, tmp_path) -> list:
    common = ["--device", "cpu"]
    return {
        "generate": ["generate", "--checkpoint", run, "--prompt", "the king", "--max-new-tokens", "4", *common],
        "chat": ["chat", "--checkpoint", run, "--max-new-tokens", "4", *common],
        "eval": ["eval", "--checkpoint", run, "--batches", "2", *common],
        "quantize": ["quantize", run, tmp_path / "q", "--eval-batches", "2", "--device", "cpu"],
        "export": ["export", run, tmp_path / "hf"],
    }[verb]


@pytest.mark.parametrize("verb", VERBS)
@pytest.mark.parametrize("kind", KINDS)
def test_every_verb_works_on_every_kind_of_run(runs, kind, verb, tmp_path, monkeypatch, capsys):
    from blueberry.cli.main import main

    monkeypatch.chdir(runs["plain"].parent)  # nothing is written where the tests run; one data cache for all
    if verb == "serve":
        assert _serve(runs[kind]) == 0
        return
    if verb == "chat":
        monkeypatch.setattr("sys.stdin", io.StringIO("say the king\n/reset\nagain\n"))
    code = main([str(a) for a in _argv(verb, runs[kind], tmp_path)])
    out, err = capsys.readouterr()
    if (kind, verb) in REFUSED:
        assert code == 2 and REFUSED[kind, verb] in err and "Traceback" not in err, err
        return
    assert code == 0, err[-3000:]
    if verb == "eval":
        assert "bits_per_byte" in out and json.loads((runs[kind] / "eval.json").read_text())["tokens"] > 0
    if verb == "quantize":
        assert "bits_per_byte_after" in out
        assert main(["generate", "--checkpoint", str(tmp_path / "q"), "--max-new-tokens", "2", "--device", "cpu"]) == 0
