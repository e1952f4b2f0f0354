"""Importing transformers checkpoints: tiny random models of every family we export, built and saved with
transformers offline, must give transformers' own logits after import (fp32, within 1e-4)."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import TINY_FLAGS, run_cli

COMMON = dict(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=64, rms_norm_eps=1e-6, tie_word_embeddings=False)


def families():
    import transformers as T

    return {
        "llama": T.LlamaConfig(intermediate_size=48, **COMMON),
        "llama-tied": T.LlamaConfig(intermediate_size=48, **{**COMMON, "tie_word_embeddings": True}),
        "qwen3": T.Qwen3Config(intermediate_size=48, head_dim=16, **COMMON),  # head_dim != hidden / heads
        "mixtral": T.MixtralConfig(intermediate_size=48, num_local_experts=4, num_experts_per_tok=2, **COMMON),
        "qwen2-moe": T.Qwen2MoeConfig(intermediate_size=48, moe_intermediate_size=48,
                                      shared_expert_intermediate_size=48, num_experts=4, num_experts_per_tok=2,
                                      norm_topk_prob=True, qkv_bias=True, **COMMON),
        "qwen3-moe": T.Qwen3MoeConfig(intermediate_size=48, moe_intermediate_size=48, num_experts=4,
                                      num_experts_per_tok=2, norm_topk_prob=True, head_dim=8, **COMMON),
    }


def tiny_tokenizer_dir(path):
    from transformers import PreTrainedTokenizerFast

    from blueberry.data.tokenizer import train_bpe

    tok = train_bpe(["the king speaks to the queen of night and day\n" * 40], 300)
    PreTrainedTokenizerFast(tokenizer_object=tok.hf, eos_token="<|endoftext|>").save_pretrained(path)


def save_family(name, path, shard=False):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(families()[name], dtype=torch.float32).eval()
    for p in model.parameters():  # non-trivial norms and biases too
        torch.nn.init.normal_(p, std=0.2) if p.dim() > 1 else torch.nn.init.uniform_(p, 0.5, 1.5)
    model.save_pretrained(path, max_shard_size="20KB" if shard else "5GB")
    tiny_tokenizer_dir(path)
    return model


@pytest.mark.parametrize("name", list(families()))
def test_imported_logits_equal_transformers(name, tmp_path):
    from blueberry.runs.loading import load_model

    hf = save_family(name, tmp_path / "hf", shard=name == "mixtral")
    if name == "mixtral":
        assert (tmp_path / "hf" / "model.safetensors.index.json").exists()  # sharded: the index is followed
    r = run_cli("import", tmp_path / "hf", tmp_path / "run")
    assert r.returncode == 0, r.stderr
    ours, config, tok, _ = load_model(tmp_path / "run", "cpu")
    idx = torch.randint(0, 300, (2, 24))
    with torch.no_grad():
        diff = (ours(idx).logits - hf(idx).logits).abs().max().item()
    assert diff <= 1e-4, diff
    assert type(tok).__name__ == "TransformersTokenizer" and tok.encode("the king") == \
        __import__("transformers").AutoTokenizer.from_pretrained(tmp_path / "hf").encode("the king", add_special_tokens=False)


@pytest.mark.parametrize("model_type,extra", [("standard", {}), ("moe", {"shared_expert": True, "qkv_bias": True}),
                                              ("moe", {"qk_norm": True})])
def test_import_of_an_export_is_the_run_exactly(tmp_path, model_type, extra):
    from blueberry.configs import AdaptiveMoEModelConfig
    from blueberry.data.tokenizer import train_bpe
    from blueberry.export import export_hf
    from blueberry.runs.loading import load_model
    from blueberry.models import create_model

    cfg = AdaptiveMoEModelConfig(d_model=32, n_layers=2, n_heads=4, d_ff=48, max_seq_len=32, vocab_size=300,
                                 num_experts=4, device="cpu", use_fp8=False, model_type=model_type,
                                 **{"qk_norm": False, **extra}).validate()
    model = create_model(cfg).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3)
    export_hf(model, train_bpe(["the king and the queen " * 30], 300), tmp_path / "hf")
    assert run_cli("import", tmp_path / "hf", tmp_path / "run", "--seq-len", "32").returncode == 0
    back, *_ = load_model(tmp_path / "run", "cpu")
    theirs = back.state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(value, theirs[key]), key


@pytest.mark.parametrize("field,value,message", [
    ("rope_scaling", {"rope_type": "yarn", "factor": 4.0}, "rope_scaling"),
    ("hidden_act", "gelu", "hidden_act"),
    ("attention_bias", True, "attention_bias"),
])
def test_unrepresentable_configs_are_refused_naming_the_field(tmp_path, field, value, message):
    save_family("llama", tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg[field] = value
    if field == "rope_scaling":
        cfg.pop("rope_parameters", None)
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    r = run_cli("import", tmp_path / "hf", tmp_path / "run")
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr


def test_continued_pretraining_starts_from_the_imported_weights(tmp_path, corpus_dir):
    from blueberry.runs.loading import load_model
    from blueberry.runs.layout import read_metrics

    save_family("qwen3", tmp_path / "hf")
    assert run_cli("import", tmp_path / "hf", tmp_path / "imported").returncode == 0
    flags = [f for f in TINY_FLAGS]
    for name in ("--model-type", "--d-model", "--n-layers", "--n-heads", "--num-experts", "--vocab-size"):
        i = flags.index(name)
        del flags[i:i + 2]
    common = ["--dataset", corpus_dir, "--cache-dir", tmp_path / "c", "--max-steps", "3", "--eval-every", "3",
              "--no-compile", "--optimizer", "adamw", *flags]
    frozen = run_cli("--init-from", tmp_path / "imported", "--lr", "1e-12", "--out-dir", tmp_path / "frozen", *common)
    assert frozen.returncode == 0, frozen.stderr
    assert "Initialised from" in frozen.stdout
    source, *_ = load_model(tmp_path / "imported", "cpu")
    trained, config, tok, _ = load_model(tmp_path / "frozen", "cpu")
    assert config.qk_norm and config.attention_head_dim == 16 and type(tok).__name__ == "TransformersTokenizer"
    for (name, a), b in zip(source.state_dict().items(), trained.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name  # lr ~ 0: still the imported weights
    learning = run_cli("--init-from", tmp_path / "hf", "--lr", "3e-3", "--out-dir", tmp_path / "learns", *common)
    assert learning.returncode == 0, learning.stderr
    losses = [r["loss"] for r in read_metrics(tmp_path / "learns") if r["kind"] == "train"]
    assert losses[-1] < losses[0]
    evals = [r for r in read_metrics(tmp_path / "learns") if r["kind"] == "eval"]
    assert evals[0]["step"] == 0 and evals[-1]["loss"] < evals[0]["loss"]  # the "before" is logged
    clash = run_cli("--init-from", tmp_path / "hf", "--d-model", "64", "--out-dir", tmp_path / "x", *common)
    assert clash.returncode == 2 and "--init-from" in clash.stderr


# ---------------------------------------------------------------- prompts of imported models, drafts
def tokenizer_dir_with_bos(path):
    """The tiny tokenizer with a beginning-of-sequence token <s> distinct from its end-of-text (Llama style)."""
    from transformers import PreTrainedTokenizerFast

    from blueberry.data.tokenizer import train_bpe

    tok = train_bpe(["the king speaks to the queen of night and day\n" * 40], 299)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok.hf, eos_token="<|endoftext|>", bos_token="<s>")
    assert fast.bos_token_id != fast.eos_token_id and len(fast) <= 300
    fast.save_pretrained(path)
    return fast


@pytest.fixture(scope="module")
def imported_with_bos(tmp_path_factory):
    root = tmp_path_factory.mktemp("bos")
    save_family("llama", root / "hf")
    tokenizer_dir_with_bos(root / "hf")
    assert run_cli("import", root / "hf", root / "run").returncode == 0
    return root


def test_prompts_of_an_imported_model_start_with_its_bos_as_transformers_and_lm_eval(imported_with_bos):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from blueberry.evaluation.harness import BlueberryLM

    hf_dir, run = imported_with_bos / "hf", imported_with_bos / "run"
    ours = BlueberryLM(checkpoint=str(run), device="cpu", batch_size=4)
    theirs = HFLM(pretrained=str(hf_dir), dtype="float32", device="cpu", batch_size=4)
    pairs = [Instance("loglikelihood", {}, ("", "the king speaks"), 0),
             Instance("loglikelihood", {}, ("the queen", " of night"), 1)]
    for (a, _), (b, _) in zip(ours.loglikelihood(pairs), theirs.loglikelihood(pairs)):
        assert a == pytest.approx(b, abs=1e-3)
    rolling = [Instance("loglikelihood_rolling", {}, ("the king speaks to the queen",), 0)]
    assert ours.loglikelihood_rolling(rolling)[0] == pytest.approx(theirs.loglikelihood_rolling(rolling)[0], abs=1e-3)
    tok, model = AutoTokenizer.from_pretrained(hf_dir), AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    ids = torch.tensor([[tok.bos_token_id] + tok.encode("the king", add_special_tokens=False)])  # Llama's way
    out = model.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.eos_token_id)
    expected = "the king" + tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    r = run_cli("generate", "--checkpoint", run, "--prompt", "the king", "--temperature", "0", "--max-new-tokens",
                "8", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert r.stdout.rstrip("\n") == expected
    assert ours.tokenizer.prefix_id == theirs.prefix_token_id == theirs.tokenizer.bos_token_id


def test_two_imports_sharing_a_tokenizer_can_draft_for_each_other(tmp_path):
    save_family("llama", tmp_path / "big")
    save_family("qwen3", tmp_path / "small")
    for name in ("big", "small"):
        assert run_cli("import", tmp_path / name, tmp_path / f"run-{name}").returncode == 0
    r = run_cli("generate", "--checkpoint", tmp_path / "run-big", "--draft", tmp_path / "run-small", "--prompt",
                "the king", "--temperature", "0", "--max-new-tokens", "6", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert "draft tokens accepted" in r.stderr
    plain = run_cli("generate", "--checkpoint", tmp_path / "run-big", "--prompt", "the king", "--temperature", "0",
                    "--max-new-tokens", "6", "--device", "cpu")
    assert r.stdout == plain.stdout  # greedy: the target's own output
