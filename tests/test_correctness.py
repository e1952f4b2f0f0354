"""Correctness of figures and behaviours checked against independent references: exported special tokens
(transformers' own generate), bits per byte (UTF-8 bytes of the decoded text, float64 log-probabilities),
router numerics, fp16 loss scaling, the fused loss under no_grad (a FLOP counter), CLI strictness."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch

from blueberry.configs import AdaptiveMoEModelConfig
from blueberry.data.tokenizer import load_tokenizer, train_bpe
from blueberry.models import create_model
from helpers import TINY_FLAGS, run_cli

MIXED_TEXT = ["Καλημέρα κόσμε, the king 👑 speaks 🗡️ to Ἀθηνᾶ. ",
              "naïve café — 日本語 and emoji 😀🎉 in one line\n",
              "ROMEO: O, she doth teach the torches to burn bright! 🔥"]


def _model_config(**kw):
    base = dict(d_model=32, n_layers=2, n_heads=4, d_ff=48, max_seq_len=32, vocab_size=300, num_experts=4,
                device="cpu", use_fp8=False, use_amp=False, compile=False)
    base.update(kw)
    return AdaptiveMoEModelConfig(**base).validate()


# ---------------------------------------------------------------- exported special tokens (item 3)
@pytest.fixture(scope="module")
def short_docs(tmp_path_factory):
    """Many one-line documents, so that a briefly trained model soon predicts end-of-text."""
    rng = random.Random(3)
    words = "the king queen speaks night day love war fire".split()
    path = tmp_path_factory.mktemp("short") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": " ".join(rng.choice(words) for _ in range(rng.randint(2, 4)))}) + "\n"
                            for _ in range(600)))
    return path


@pytest.mark.parametrize("model_type", ["standard", "moe"])
def test_export_stops_at_end_of_text_and_matches_our_greedy_output(short_docs, tmp_path, model_type):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = tmp_path / "run"
    r = run_cli("--dataset", short_docs, "--cache-dir", tmp_path / "c", "--out-dir", run, "--model-type", model_type,
                "--max-steps", "60", "--eval-every", "60", "--no-compile", "--lr", "0.03", *TINY_FLAGS)
    assert r.returncode == 0, r.stderr
    g = run_cli("generate", "--checkpoint", run, "--prompt", "the king", "--temperature", "0",
                "--max-new-tokens", "28")
    assert g.returncode == 0, g.stderr
    ours = g.stdout[:-1]  # the prompt, the continuation, the closing newline
    x = run_cli("export", run, tmp_path / "hf")
    assert x.returncode == 0, x.stderr

    tok = load_tokenizer(str(run / "tokenizer.json"))
    eot = tok.eot_id
    for name in ("config.json", "generation_config.json"):
        cfg = json.loads((tmp_path / "hf" / name).read_text())
        assert cfg["eos_token_id"] == eot and cfg["bos_token_id"] == eot and cfg["pad_token_id"] == eot, name
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", local_files_only=True, dtype=torch.float32).eval()
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "hf", local_files_only=True)
    prompt = [eot] + tok.encode("the king")
    out = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=28)[0, len(prompt):].tolist()
    assert eot in out, "the briefly trained model should reach end-of-text within 28 tokens"
    assert out[-1] == eot and out.count(eot) == 1  # it stopped there, and nowhere before
    assert ours == "the king" + hf_tok.decode(out, skip_special_tokens=True)


# ---------------------------------------------------------------- bits per byte (item 4)
def _transformers_byte_level_dir(tmp_path):
    from transformers import PreTrainedTokenizerFast

    tok = train_bpe(MIXED_TEXT * 30, 400)  # byte-level BPE; emoji and Greek split inside characters
    fast = PreTrainedTokenizerFast(tokenizer_object=tok.hf, eos_token="<|endoftext|>")
    fast.save_pretrained(tmp_path / "hf_tok")
    return tmp_path / "hf_tok"


def test_token_bytes_count_real_utf8_bytes(tmp_path):
    text = "".join(MIXED_TEXT) + " ἄνδρα μοι ἔννεπε 🦉"
    ours = train_bpe(MIXED_TEXT * 30, 400)
    auto = load_tokenizer(str(_transformers_byte_level_dir(tmp_path)))
    assert type(auto).__name__ == "TransformersTokenizer"
    for tok in (ours, auto):
        ids = tok.encode(text)
        partial = [i for i in ids if "\ufffd" in tok.decode([i])]
        assert partial, "the test needs tokens that hold part of a character"
        assert int(tok.token_bytes()[ids].sum()) == len(text.encode("utf-8"))
        assert tok.token_bytes()[tok.eot_id] == 0


def test_bits_per_byte_leaves_out_end_of_text_and_counts_real_bytes():
    from blueberry.data import ShardedLoader, create_dataset
    from blueberry.training.evaluation import evaluate_model

    tok = train_bpe(MIXED_TEXT * 30, 400)
    docs = ["".join(random.Random(i).sample(MIXED_TEXT, 3)) for i in range(12)]
    stream = []
    for d in docs:
        stream += [tok.eot_id] + tok.encode(d)
    seq = 32
    n = (len(stream) - 1) // seq
    tokens = np.array(stream[:n * seq + 1], dtype=np.int64)
    cfg = _model_config(vocab_size=400, max_seq_len=seq, model_type="standard")
    model = create_model(cfg).eval()
    loader = ShardedLoader([create_dataset(tokens, "packed", seq)], 4, shuffle=False)
    result = evaluate_model(model, loader, cfg, token_bytes=tok.token_bytes())

    # reference: float64 log-probabilities of every target that is not end-of-text, over the UTF-8 bytes
    # of the text those targets decode to
    scored = n // 4 * 4 * seq
    with torch.no_grad():
        logits = model.double()(torch.from_numpy(tokens[:scored]).view(-1, seq)).logits
    logp = torch.log_softmax(logits, -1).view(-1, logits.shape[-1])
    targets = torch.from_numpy(tokens[1:scored + 1])
    keep = targets != tok.eot_id
    nats = -logp[torch.arange(scored)[keep], targets[keep]].sum().item()
    text = tok.decode(targets[keep].tolist())
    expected = nats / math.log(2) / len(text.encode("utf-8"))
    assert result["bits_per_byte"] == pytest.approx(expected, rel=1e-5)


# ---------------------------------------------------------------- document validation set (item 5)
def test_document_validation_set_scores_every_token_once():
    from blueberry.data import create_dataset

    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 90, size=40)  # many documents shorter than one window
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    tokens = rng.integers(1, 50, size=int(lengths.sum()))
    seq = 32
    ds = create_dataset(tokens, "document", seq, doc_starts=starts, score_once=True)
    scored = []
    for i in range(len(ds)):
        start = int(ds.starts[i])
        x, y = ds[i]
        assert np.array_equal(x, tokens[start:start + seq])
        scored += [start + 1 + j for j in range(seq) if y[j] != -100]
        for j in range(seq):
            if y[j] != -100:
                assert y[j] == tokens[start + 1 + j]
    assert sorted(scored) == list(range(1, len(tokens)))  # every target once, none twice, none lost


# ---------------------------------------------------------------- router numerics (item 6)
def test_router_runs_in_fp32_under_autocast():
    from blueberry.models import MixtureOfExperts

    moe = MixtureOfExperts(32, 48, num_experts=4, top_k=2)
    x = torch.randn(10, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, probs, top_w, _ = moe.route(x)
    assert logits.dtype == probs.dtype == top_w.dtype == torch.float32
    ref = (x.double() @ moe.router.weight.double().t())
    assert (logits.double() - ref).abs().max() < 1e-5  # fp32 accuracy, not bf16's ~1e-2


def test_top1_router_learns_from_the_language_model_loss():
    cfg = _model_config(model_type="moe", expert_top_k=1, load_balancing_weight=0.0, router_z_loss_weight=0.0)
    model = create_model(cfg)
    idx = torch.randint(0, 300, (2, 16))
    out = model(idx, torch.randint(0, 300, (2, 16)))
    out.loss.backward()
    for block in model.blocks:
        # renormalised to 1, the weight's gradient is rounding noise (~1e-10); as a probability it is real
        router, experts = block.ffn.router.weight.grad.norm(), block.ffn.w_up.grad.norm()
        assert router > 1e-3 * experts


# ---------------------------------------------------------------- MFU over the job (item 7)
def test_job_peak_counts_processes_not_visible_gpus():
    from blueberry.system.capabilities import capabilities_for_device

    gpu = capabilities_for_device("cuda", compute_capability=(9, 0), device_count=8)
    assert gpu.job_peak_flops(world_size=1, local_world_size=1) == gpu.peak_flops  # one process, one GPU
    assert gpu.job_peak_flops(world_size=16, local_world_size=8) == 16 * gpu.peak_flops
    cpu = capabilities_for_device("cpu", cpu_flags={"amx_bf16"}, cpu_cores=2)
    assert cpu.job_peak_flops(world_size=2, local_world_size=2) == cpu.peak_flops  # two processes share the cores


# ---------------------------------------------------------------- fp16 loss scaling (item 8)
def test_fp16_overflow_steps_are_not_failures_and_do_not_advance_the_schedule(tiny, monkeypatch):
    from blueberry.training import run_training, trainer
    from blueberry.runs.checkpoint import read_state, resolve_checkpoint
    from blueberry.runs.layout import read_metrics
    from blueberry.training.precision import Precision

    # a scale so high that the first steps overflow fp16 gradients, lowered 1024x per overflow
    def fp16(config, caps):
        return Precision("cpu", torch.float16, torch.amp.GradScaler("cpu", init_scale=2.0**60, backoff_factor=2**-10))

    monkeypatch.setattr(trainer, "choose_precision", fp16)
    cfg = tiny(model_type="standard", optimizer="adamw", max_steps=6, eval_every=6, checkpoint_every=6,
               max_nonfinite_steps=2, compile=False, use_amp=True)
    _, metrics = run_training(cfg)
    assert metrics["overflow_steps"] >= 2 and metrics["skipped_steps"] == 0 and metrics["step"] == 6
    train = [r for r in read_metrics(cfg.out_dir) if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    state = read_state(resolve_checkpoint(cfg.out_dir))
    adam_steps = {int(s["step"]) for s in state["optimizers"][0]["state"].values()}
    assert adam_steps == {6}  # six real updates: no overflow counted as one
    assert state["scheduler"]["step_count"] == 6  # the schedule counted updates, not overflows


# ---------------------------------------------------------------- fused loss under no_grad (item 9)
def test_fused_cross_entropy_does_no_gradient_work_under_no_grad():
    from torch.utils.flop_counter import FlopCounterMode

    from blueberry.ops.cross_entropy import linear_cross_entropy

    n, d, v = 256, 64, 512
    h = torch.randn(n, d, requires_grad=True)
    w = torch.randn(v, d, requires_grad=True)
    t = torch.randint(0, v, (n,))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        loss = linear_cross_entropy(h, w, t)
    assert counter.get_total_flops() == 2 * n * d * v  # the logits' matmul and nothing more
    ref = torch.nn.functional.cross_entropy(h.detach().double() @ w.detach().double().t(), t)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)


# ---------------------------------------------------------------- resume latest, strict flags (items 10, 11)
def test_resume_latest_uses_the_given_out_dir(corpus_dir, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    common = ["--dataset", corpus_dir, "--cache-dir", tmp_path / "c", "--no-compile", *TINY_FLAGS]
    a = run_cli(*common, "--out-dir", elsewhere, "--max-steps", "4", "--checkpoint-every", "2", cwd=tmp_path)
    assert a.returncode == 0, a.stderr
    b = run_cli("--resume-from", "latest", "--out-dir", elsewhere, "--max-steps", "6", cwd=tmp_path)
    assert b.returncode == 0, b.stderr
    assert f"Resuming from {elsewhere / 'checkpoints' / 'step_000004'}" in b.stdout
    empty = run_cli("--resume-from", "latest", "--out-dir", tmp_path / "new", cwd=tmp_path)
    assert empty.returncode == 1 and "has no checkpoint yet" in empty.stderr


@pytest.mark.parametrize("flag", ["--checkpoint", "--resume", "--max-step", "--lr-sched"])
def test_abbreviated_flags_are_refused(flag):
    r = run_cli(flag, "5", "--max-steps", "1")
    assert r.returncode == 2 and "unrecognized arguments" in r.stderr and flag in r.stderr
