"""A transformers export that stands on its own (model card, chat template), and `blueberry push` against a
local stand-in for the Hub API (no network)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from helpers import ROOT, TINY_FLAGS, cli_env, free_port, run_cli

MESSAGES = [{"role": "system", "content": "  Be brief. "}, {"role": "user", "content": "the king\nand the queen"},
            {"role": "assistant", "content": "rise"}, {"role": "user", "content": "fire 🔥?"}]


def _flags() -> list[str]:
    flags = list(TINY_FLAGS)
    flags[flags.index("--model-type") + 1] = "standard"
    return flags


@pytest.fixture(scope="module")
def run(corpus_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hub_run")
    r = run_cli("--dataset", corpus_dir, "--cache-dir", root / "cache", "--out-dir", root / "run", "--max-steps", "3",
                "--eval-every", "3", "--no-compile", *_flags())
    assert r.returncode == 0, r.stderr[-3000:]
    return root / "run"


def _front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


@pytest.mark.slow
def test_hf_export_has_card_and_chat_template(run, tmp_path):
    from transformers import AutoTokenizer

    from blueberry.data.chat_template import chat_prompt_ids
    from blueberry.runs.loading import run_tokenizer

    out = tmp_path / "hf"
    r = run_cli("export", run, out, "--license", "apache-2.0")
    assert r.returncode == 0, r.stderr[-3000:]
    card = (out / "README.md").read_text(encoding="utf-8")
    meta = _front_matter(card)
    assert meta["license"] == "apache-2.0" and meta["library_name"] == "transformers"
    assert "blueberry" in meta["tags"] and "datasets" not in meta  # a local corpus is no Hub dataset
    summary = json.loads((run / "summary.json").read_text())
    for heading in ("## Data", "## Recipe", "## Results", "## Use"):
        assert heading in card
    assert f"| loss | {summary['loss']:.4f} |" in card and "| Steps | 3 |" in card
    assert "AutoModelForCausalLM.from_pretrained" in card and "blueberry import" in card
    config = json.loads((out / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["chat_template"]
    hf_tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    ids = hf_tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if not isinstance(ids, list) else ids
    assert ids == chat_prompt_ids(MESSAGES, run_tokenizer(run))


class HubStandIn:
    """tests/hub_stand_in.py on a free loopback port, in a process group of its own, killed whole on exit."""

    def __init__(self, store: Path, *flags: str):
        self.store, self.flags = store, flags

    def __enter__(self) -> "HubStandIn":
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "hub_stand_in.py"), str(port),
                                      str(self.store), *self.flags], start_new_session=True)
        deadline = time.time() + 30
        while not (self.store / "ready").exists():
            assert self.proc.poll() is None and time.time() < deadline, "the Hub stand-in did not start"
            time.sleep(0.05)
        return self

    def requests(self) -> list[dict]:
        return [json.loads(line) for line in (self.store / "requests.log").read_text().splitlines()]

    def __exit__(self, *exc) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)


def _push(hub: HubStandIn, *args) -> subprocess.CompletedProcess:
    env = dict(cli_env(), HF_ENDPOINT=hub.url, HF_HUB_OFFLINE="0", HF_HUB_DISABLE_PROGRESS_BARS="1",
               HF_HOME=str(hub.store.parent / "hf_home"))
    env.pop("HF_TOKEN", None)
    return subprocess.run([sys.executable, "-m", "blueberry", "push", *map(str, args)], capture_output=True, text=True,
                          timeout=300, env=env, cwd=ROOT)


@pytest.mark.slow
def test_push_uploads_run_and_export(run, tmp_path):
    export = tmp_path / "export"
    assert run_cli("export", run, export).returncode == 0
    with HubStandIn(tmp_path / "hub") as hub:
        r = _push(hub, export, "alice/tiny", "--token", "hf_test")
        assert r.returncode == 0, r.stderr[-3000:]
        got = hub.store / "alice" / "tiny"
        sent = sorted(p.name for p in export.iterdir())
        assert sorted(p.name for p in got.iterdir() if p.name != ".repo.json") == sent
        for name in sent:
            assert (got / name).read_bytes() == (export / name).read_bytes(), name
        writes = [req for req in hub.requests() if req["method"] == "POST"]
        assert [req["path"].split("/")[-2 if "main" in req["path"] else -1] for req in writes] == [
            "create", "validate-yaml", "preupload", "commit"]
        assert all(req["auth"] == "Bearer hf_test" for req in writes)
        assert json.loads((got / ".repo.json").read_text())["name"] == "tiny"

        r = _push(hub, run, "alice/from-run", "--private", "--token", "hf_test")  # a run: exported first
        assert r.returncode == 0, r.stderr[-3000:]
        got = hub.store / "alice" / "from-run"
        assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= {p.name for p in got.iterdir()}
        assert json.loads((got / ".repo.json").read_text())["visibility"] == "private"
        card = (got / "README.md").read_text(encoding="utf-8")
        assert "hf download alice/from-run" in card and 'from_pretrained("alice/from-run")' in card
        assert all(req["path"].startswith("/api/") for req in hub.requests())


@pytest.mark.slow
def test_push_refusals_are_one_line(run, tmp_path):
    with HubStandIn(tmp_path / "hub", "--refuse-create") as hub:
        r = _push(hub, run, "alice/tiny", "--token", "hf_test")
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr[-3000:]
        assert "refused alice/tiny" in r.stderr
        r = _push(hub, tmp_path / "missing", "alice/tiny")
        assert r.returncode == 2 and "no such export or run" in r.stderr
        r = _push(hub, run, "a/b/c")
        assert r.returncode == 2 and "repo id" in r.stderr
