"""Ensembles (`--ensemble N`, `EnsembleLM`) against independent references: the mixture of the members'
distributions computed in float64 from each member alone, uncached generation, and the command line
(side by side or one after another, stopped and resumed, used by every command)."""

from __future__ import annotations

import copy
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from blueberry.configs import AdaptiveMoEModelConfig
from blueberry.configs.adaptive_moe_config import _hardware_defaults
from blueberry.data.tokenizer import train_bpe
from blueberry.inference import Engine, SamplingParams
from blueberry.models import create_model
from blueberry.models.ensemble import EnsembleLM
from blueberry.system import capabilities_for_device
from helpers import ROOT, TINY_FLAGS, cli_env, run_cli

TEXT = ["the king speaks to the queen of night and day, love and war\n" * 3, "fire and wind, stone and river\n"]


def member(seed, **kw):
    torch.manual_seed(seed)
    base = dict(model_type="standard", d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=64, vocab_size=300,
                num_experts=4, device="cpu", use_fp8=False, ssm_head_dim=16, ssm_state=8, scan_chunk=16)
    model = create_model(AdaptiveMoEModelConfig(**{**base, **kw}).validate()).eval()
    for p in model.parameters():  # larger weights: distinct, decisive members
        if p.dim() > 1:
            torch.nn.init.normal_(p, std=0.2)
    return model


def members():
    """Three different stacks: attention + MLP, attention + MoE, retention + attention."""
    return [member(1), member(2, model_type="moe"), member(3, layers="retention:mlp,attn:mlp")]


def float64_mixture(models, idx):
    probs = [torch.softmax(copy.deepcopy(m).double()(idx).logits, dim=-1) for m in models]
    return torch.log(torch.stack(probs).mean(0))


def test_logits_and_loss_are_those_of_the_mean_distribution():
    models = members()
    ensemble = EnsembleLM(models).eval()
    idx = torch.randint(0, 300, (3, 40))
    targets = torch.randint(0, 300, (3, 40))
    targets[0, :7] = -100  # not scored
    with torch.no_grad():
        out = ensemble(idx, targets, return_logits=True)
        ref = float64_mixture(models, idx)
    torch.testing.assert_close(out.logits.double(), ref, atol=2e-5, rtol=0)
    scored = targets != -100
    ref_loss = -ref.gather(-1, targets.clamp(min=0)[..., None])[..., 0][scored].mean()
    assert abs(out.loss.item() - ref_loss.item()) < 1e-5
    # the mixture is no single member's distribution
    assert all((out.logits - torch.log_softmax(m(idx).logits, -1)).abs().max() > 0.1 for m in models)


def test_engine_generation_equals_the_uncached_mixture():
    """Batched, cached decoding through the slots (each member's caches, a retention state among them)
    equals greedy decoding that recomputes the whole ensemble every token."""
    ensemble = EnsembleLM(members()).eval()
    engine = Engine(ensemble, train_bpe(TEXT * 20, 300), slots=3)
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(1, 300, (int(n),), generator=g).tolist() for n in torch.randint(1, 10, (5,), generator=g)]
    outs = engine.generate(prompts, SamplingParams(max_new_tokens=12, temperature=0, stop_at_eot=False))
    for prompt, seq in zip(prompts, outs):
        expected, ids = [], list(prompt)
        with torch.no_grad():
            for _ in range(12):
                ids.append(int(ensemble(torch.tensor([ids])).logits[0, -1].argmax()))
                expected.append(ids[-1])
        assert seq.output_ids == expected
        steps = ensemble.generate(torch.tensor([prompt]), 12, temperature=0)  # the model's own cached sampler
        assert [int(t) for t in steps] == expected


def test_members_must_share_vocabulary_and_context():
    with pytest.raises(ValueError, match="vocabulary"):
        EnsembleLM([member(1), member(2, vocab_size=320)])
    with pytest.raises(ValueError, match="at least two"):
        EnsembleLM([member(1)])


def test_every_default_is_one_model_planned_by_a_budget_and_an_ensemble_only_when_asked():
    from types import SimpleNamespace

    def unset(**given):  # a config before the device fills in what the user left out
        names = ("model_type", "d_model", "n_layers", "n_heads", "max_steps", "batch_size", "max_seq_len", "layers",
                 "ensemble", "mlp_type", "time_budget")
        return SimpleNamespace(**{**dict.fromkeys(names), "mlp_type": "swiglu", **given})

    two, one = (capabilities_for_device("cpu", cpu_cores=n, cpu_flags=set()) for n in (2, 1))
    gpu = capabilities_for_device("cuda", compute_capability=(9, 0), memory_gb=80.0, cpu_cores=2, cpu_flags=set())
    for caps in (two, one, gpu):
        chosen = _hardware_defaults(caps, unset())
        assert (chosen["ensemble"], chosen["time_budget"]) == (1, "10m")  # one model, planned by the budget
    asked = _hardware_defaults(two, unset(ensemble=2))
    assert asked["max_steps"] == 800 and "time_budget" not in asked  # members a little shorter than one run
    assert "time_budget" not in _hardware_defaults(two, unset(max_steps=50))  # given steps are steps
    assert _hardware_defaults(two, unset(time_budget="2m"))["time_budget"] == "2m"
    assert AdaptiveMoEModelConfig(device="cpu", d_model=128, ensemble=3).ensemble == 3


# ---- the command line ----
FLAGS = [*TINY_FLAGS, "--no-compile", "--no-amp", "--eval-tasks", "none"]


@pytest.fixture(scope="module")
def ensemble_run(corpus_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("ensemble")
    r = run_cli("--dataset", corpus_dir, "--cache-dir", root / "cache", "--out-dir", root / "run", "--max-steps", "8",
                "--ensemble", "2", "--seed", "5", *FLAGS)
    assert r.returncode == 0, r.stderr
    return root / "run", r.stdout


def mixture_bits_per_byte(runs) -> float:
    """The reference: each run loaded alone, their probabilities averaged in float64 on the first run's
    validation windows."""
    from blueberry.cli.use_cmds import _packed_loader
    from blueberry.data import load_and_cache_data
    from blueberry.runs.loading import load_model

    loaded = [load_model(r, "cpu") for r in runs]
    config, tok = loaded[0][1], loaded[0][2]
    _, _, corpus = load_and_cache_data(config)
    tb = torch.as_tensor(tok.token_bytes(), dtype=torch.float64)
    nats = nbytes = 0.0
    with torch.no_grad():
        for x, y in _packed_loader(corpus.val, config, config.eval_batches):
            mix = float64_mixture([m for m, *_ in loaded], x)
            lp = mix.gather(-1, y[..., None])[..., 0]
            b = tb[y]
            nats -= lp[b > 0].sum().item()
            nbytes += b.sum().item()
    return nats / math.log(2) / nbytes


def test_an_ensemble_run_scores_the_mixture_of_its_members(ensemble_run):
    run, stdout = ensemble_run
    assert json.loads((run / "ensemble.json").read_text())["members"] == ["members/0", "members/1"]
    seeds = [json.loads((run / "members" / str(i) / "config.json").read_text())["seed"] for i in (0, 1)]
    assert seeds == [5, 6]
    if len(os.sched_getaffinity(0)) >= 2:
        assert "side by side" in stdout
    summary = json.loads((run / "summary.json").read_text())
    reference = mixture_bits_per_byte([run / "members" / str(i) for i in (0, 1)])
    assert abs(summary["bits_per_byte"] - reference) < 1e-4
    assert [m["seed"] for m in summary["members"]] == [5, 6]
    # Jensen: on the same windows the mixture's log-loss is at most the members' mean, token by token
    assert summary["bits_per_byte"] <= sum(m["bits_per_byte"] for m in summary["members"]) / 2 + 1e-6


def test_every_command_takes_the_ensemble(ensemble_run, tmp_path, capsys):
    from blueberry.cli.main import main

    run, _ = ensemble_run
    assert main(["generate", "--checkpoint", str(run), "--prompt", "the king", "--max-new-tokens", "8",
                 "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("the king")
    assert main(["eval", "--checkpoint", str(run), "--batches", "2"]) == 0
    evaluated = json.loads((run / "eval.json").read_text())["bits_per_byte"]
    assert abs(evaluated - json.loads((run / "summary.json").read_text())["bits_per_byte"]) < 1e-4
    assert main(["quantize", str(run), str(tmp_path / "q"), "--eval-batches", "2"]) == 0
    report = json.loads((tmp_path / "q" / "quantization.json").read_text())
    assert abs(report["bits_per_byte_change_percent"]) < 2
    assert main(["generate", "--checkpoint", str(tmp_path / "q"), "--prompt", "the", "--max-new-tokens", "4"]) == 0
    assert main(["generate", "--checkpoint", str(run), "--draft", str(run / "members" / "0"), "--prompt", "the",
                 "--max-new-tokens", "6", "--temperature", "0"]) == 0
    capsys.readouterr()
    assert main(["compare", str(run), str(run / "members" / "0"), "--out", str(tmp_path / "c.png")]) == 0
    table = capsys.readouterr().out
    summary = json.loads((run / "summary.json").read_text())
    assert "(ensemble of 2)" in table and f"{summary['bits_per_byte']:.4f}" in table


def test_what_an_ensemble_cannot_do_is_refused_in_one_line(ensemble_run, corpus_dir, tmp_path, capsys):
    from blueberry.cli.main import main

    run, _ = ensemble_run
    data = ["--dataset", str(corpus_dir), "--cache-dir", str(tmp_path / "cache")]
    for args, says in [(["export", str(run), str(tmp_path / "hf")], "is an ensemble of 2 runs"),
                       ([*data, "--init-from", str(run), "--out-dir", str(tmp_path / "i")], "is an ensemble of 2 runs"),
                       ([*data, "--out-dir", str(run), "--ensemble", "2", *FLAGS], "already holds an ensemble"),
                       ([*data, "--ensemble", "0", *FLAGS], "--ensemble"),
                       ([*data, "--ensemble", "2", "--lr", "0.01", "--lr", "0.02", *FLAGS], "sweep"),
                       (["--resume-from", str(run), "--max-steps", "20"], "resumes with its own settings")]:
        assert main([str(a) for a in args]) == 2, args
        err = capsys.readouterr().err
        assert says in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_finished_runs_combine_into_an_ensemble_that_every_command_takes(ensemble_run, tmp_path, capsys):
    """`blueberry ensemble RUN RUN --out DIR`: members named (not copied), the mixture scored as the float64
    reference and as `--ensemble` scored the same members; eval and generate take DIR; it does not resume."""
    from blueberry.cli.main import main
    from blueberry.runs.ensemble_dir import ensemble_members

    run, _ = ensemble_run
    runs, out = [run / "members" / "0", run / "members" / "1"], tmp_path / "combined"
    assert main(["ensemble", *map(str, runs), "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert "mixture" in table and "(seed 6)" in table
    assert json.loads((out / "ensemble.json").read_text())["members"] == [str(r.resolve()) for r in runs]
    assert ensemble_members(out) == [r.resolve() for r in runs]
    assert json.loads((out / "config.json").read_text())["ensemble"] == 2 and (out / "tokenizer.json").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert abs(summary["bits_per_byte"] - mixture_bits_per_byte(runs)) < 1e-4
    assert abs(summary["bits_per_byte"] - json.loads((run / "summary.json").read_text())["bits_per_byte"]) < 1e-6
    for row in summary["members"]:  # each member on the same windows: its own final figure
        assert abs(row["bits_per_byte"] - row["own_bits_per_byte"]) < 1e-4
    assert f"{summary['bits_per_byte']:.4f}" in table
    assert main(["eval", "--checkpoint", str(out), "--batches", "2"]) == 0
    assert abs(json.loads((out / "eval.json").read_text())["bits_per_byte"] - summary["bits_per_byte"]) < 1e-4
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(out), "--prompt", "the king", "--max-new-tokens", "8",
                 "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("the king")
    assert main(["--resume-from", str(out)]) == 2
    assert "nothing to resume" in capsys.readouterr().err
    # a member named relative to the ensemble directory is found as well
    (tmp_path / "relative").mkdir()
    (tmp_path / "relative" / "ensemble.json").write_text(json.dumps(
        {"format": 1, "members": [os.path.relpath(runs[0], tmp_path / "relative"), str(runs[1])]}))
    assert [m.resolve() for m in ensemble_members(tmp_path / "relative")] == [r.resolve() for r in runs]


def test_combining_refuses_in_one_line_and_writes_nothing(ensemble_run, tmp_path, capsys):
    import shutil

    from blueberry.cli.main import main

    run, _ = ensemble_run
    m0, m1 = run / "members" / "0", run / "members" / "1"
    other_tok, unfinished, foreign = tmp_path / "other_tok", tmp_path / "unfinished", tmp_path / "foreign"
    shutil.copytree(m1, other_tok)
    train_bpe(TEXT * 20, 280).save(str(other_tok / "tokenizer.json"))
    shutil.copytree(m1, unfinished)
    summary = json.loads((unfinished / "summary.json").read_text())
    (unfinished / "summary.json").write_text(json.dumps({**summary, "step": 3}))
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert main(["quantize", str(m0), str(tmp_path / "q"), "--eval-batches", "1"]) == 0
    capsys.readouterr()
    out = tmp_path / "out"
    for runs, target, says in [([m0], out, "at least two runs"), ([m0, tmp_path / "nope"], out, "no such run"),
                               ([m0, unfinished], out, "not a finished run (step 3 of 8)"),
                               ([m0, other_tok], out, "another tokenizer"), ([m0, run], out, "itself an ensemble"),
                               ([m0, tmp_path / "q"], out, "quantized (int8)"), ([m0, m0], out, "given twice"),
                               ([m0, m1], foreign, "already holds files"), ([m0, m1], run, "already holds an ensemble"),
                               ([m0, m1], m0 / "combined", "inside the run")]:
        assert main(["ensemble", *map(str, runs), "--out", str(target)]) == 2, (runs, target)
        err = capsys.readouterr().err
        assert says in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists() and not (m0 / "combined").exists() and not list(tmp_path.glob(".*partial*"))
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]


def test_more_members_than_cores_train_one_after_another(tiny):
    from blueberry.training.ensemble import run_ensemble

    n = len(os.sched_getaffinity(0)) + 1
    config = tiny(model_type="standard", ensemble=n, compile=False, eval_tasks="none")
    ensemble, metrics = run_ensemble(config)
    assert len(ensemble.members) == n and len(metrics["members"]) == n
    first = [p for p in ensemble.members[0].parameters()][0]
    assert all(not torch.equal(first, list(m.parameters())[0]) for m in ensemble.members[1:])


def test_a_stopped_ensemble_resumes_its_unfinished_members(corpus_dir, tmp_path):
    """SIGINT to the command (as Ctrl-C would be): every member saves and stops, the command exits 130 and
    leaves no member running; --resume-from finishes the members and scores the ensemble."""
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "blueberry", "--dataset", str(corpus_dir), "--cache-dir", str(tmp_path / "cache"),
           "--out-dir", str(run), "--max-steps", "400", "--ensemble", "2", *FLAGS]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env(), cwd=ROOT,
                            start_new_session=True)
    try:
        metrics = [run / "members" / str(i) / "metrics.jsonl" for i in (0, 1)]
        deadline = time.monotonic() + 240
        while not all(m.exists() and '"train"' in m.read_text() for m in metrics):  # each member took a step
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else "timeout"
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=240)
    finally:
        os.killpg(proc.pid, signal.SIGKILL) if proc.poll() is None else None
    assert proc.returncode == 130, err
    pids = [int(line.rsplit("pid ", 1)[1].split(",")[0]) for line in out.splitlines() if ": pid " in line]
    assert len(pids) == 2
    for pid in pids:  # the members ran in sessions of their own: they must have ended with the command
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert not (run / "summary.json").exists()
    steps = [json.loads((run / "members" / str(i) / "summary.json").read_text())["step"] for i in (0, 1)]
    assert all(0 < s < 400 for s in steps), steps
    r = run_cli("--resume-from", run)
    assert r.returncode == 0, r.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert summary["step"] == 400 and summary["ensemble"] == 2
    for i in (0, 1):
        records = [json.loads(line) for line in (run / "members" / str(i) / "metrics.jsonl").read_text().splitlines()]
        assert max(r["step"] for r in records if r["kind"] == "train") == 400


def test_speculative_decoding_refuses_an_ensemble_with_a_stateful_member_at_any_position():
    """Member 0 is attention-only, member 1 has retention: the ensemble cannot roll back its state."""
    from blueberry.errors import UsageError
    from blueberry.inference.speculative import speculative_generate

    attention, stateful = member(1), member(3, layers="retention:mlp,attn:mlp")
    params = SamplingParams(max_new_tokens=4, temperature=0, stop_at_eot=False)
    for ensemble in (EnsembleLM([attention, stateful]), EnsembleLM([stateful, attention])):
        for target, draft in ((ensemble, attention), (attention, ensemble)):
            with pytest.raises(UsageError, match="retention"):
                speculative_generate(target, draft, [1, 2, 3], params, eot_id=0, k=2)
    ok = speculative_generate(EnsembleLM([attention, member(2)]), attention, [1, 2, 3], params, eot_id=0, k=2)
    assert len(ok.output_ids) == 4
