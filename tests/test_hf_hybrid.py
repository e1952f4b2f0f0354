"""Mamba-2 stacks and attention/Mamba-2 hybrids to and from transformers (Mamba2, Bamba, GraniteMoeHybrid):
fresh random tiny models must give the same logits (fp32, within 1e-4) and the same greedy continuation on
both sides; what has no exact equivalent is refused, naming the setting."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import TINY_FLAGS, run_cli

SSM = dict(ssm_state=8, ssm_head_dim=16, scan_chunk=8)

EXPORT_CASES = [
    ("mamba", {}, "Mamba2ForCausalLM"),
    ("mamba", {"tie_embeddings": False}, "Mamba2ForCausalLM"),
    ("mamba:mlp,attn:mlp", {"n_kv_heads": 2}, "BambaForCausalLM"),
    ("attn:mlp,mamba:mlp*3", {"tie_embeddings": False, "rope_theta": 500.0}, "BambaForCausalLM"),
    ("mamba:moe,attn:moe", {}, "GraniteMoeHybridForCausalLM"),
    ("mamba:moe*3,attn:moe", {"expert_top_k": 3, "n_kv_heads": 1, "tie_embeddings": False},
     "GraniteMoeHybridForCausalLM"),
]


def random_model(layers, **extra):
    from blueberry.configs import AdaptiveMoEModelConfig
    from blueberry.models import create_model

    cfg = AdaptiveMoEModelConfig(d_model=32, n_layers=4, n_heads=4, d_ff=48, max_seq_len=64, vocab_size=300,
                                 num_experts=4, device="cpu", use_fp8=False, model_type="standard", layers=layers,
                                 **{"qk_norm": False, **SSM, **extra}).validate()
    torch.manual_seed(0)
    model = create_model(cfg).eval()
    for name, p in model.named_parameters():  # random, non-trivial weights everywhere (norm gains, A, dt, D too)
        torch.nn.init.normal_(p, std=0.3) if p.dim() > 1 else torch.nn.init.uniform_(p, 0.5, 1.5)
    return cfg, model


def greedy_ours(model, idx, steps):
    return torch.cat(list(model.generate(idx, steps, temperature=0)), dim=1)


def greedy_theirs(hf, idx, steps):
    out = hf.generate(idx, max_new_tokens=steps, min_new_tokens=steps, do_sample=False, eos_token_id=None,
                      pad_token_id=0)
    return out[:, idx.shape[1]:]


@pytest.mark.parametrize("layers,extra,arch", EXPORT_CASES)
def test_exported_hybrid_logits_and_greedy_decode_match(tmp_path, layers, extra, arch):
    from transformers import AutoModelForCausalLM

    from blueberry.data.tokenizer import train_bpe
    from blueberry.export import export_hf, hf_architecture

    cfg, model = random_model(layers, **extra)
    assert hf_architecture(cfg.model) == arch
    export_hf(model, train_bpe(["the quick brown fox jumps over the lazy dog " * 20], 300), tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", local_files_only=True, dtype=torch.float32).eval()
    assert type(hf).__name__ == arch
    idx = torch.randint(0, 300, (2, 40))  # several scan chunks
    with torch.no_grad():
        assert (model(idx).logits - hf(idx).logits).abs().max().item() <= 1e-4
        assert torch.equal(greedy_ours(model, idx[:, :9], 6), greedy_theirs(hf, idx[:, :9], 6))


@pytest.mark.parametrize("layers,extra,field", [
    ("retention:mlp,mamba:mlp", {}, "retention"),
    ("mamba:mlp,mod(attn:mlp)", {}, "Mixture-of-Depths"),
    ("mamba,attn:mlp", {}, "without a feed-forward"),
    ("mamba:mlp,attn:moe", {}, "MLP and MoE"),
    ("mamba:mlp,attn:mlp", {"qk_norm": True}, "qk_norm"),
    ("mamba:mlp,attn:mlp", {"qkv_bias": True}, "qkv_bias"),
    ("mamba:mlp,attn:mlp", {"head_dim": 16}, "head_dim"),
    ("mamba:mlp,attn:mlp", {"mlp_type": "silu"}, "mlp_type"),
    ("mamba:moe,attn:moe", {"shared_expert": True}, "shared_expert"),
    ("mamba:moe,attn:moe", {"expert_top_k": 1}, "expert_top_k"),
])
def test_unmappable_hybrids_are_refused_naming_the_setting(layers, extra, field):
    from blueberry.export import ExportError, hf_architecture

    cfg, _ = random_model(layers, **extra)
    with pytest.raises(ExportError, match=field):
        hf_architecture(cfg.model)


def test_export_of_a_hybrid_without_equivalent_exits_2_in_one_line(tmp_path, corpus_dir):
    r = run_cli("--dataset", corpus_dir, "--cache-dir", tmp_path / "c", "--out-dir", tmp_path / "run", "--max-steps",
                "1", "--eval-every", "1", "--no-compile", "--layers", "mamba,attn:mlp", "--ssm-state", "8",
                "--ssm-head-dim", "16", *TINY_FLAGS)
    assert r.returncode == 0, r.stderr
    r = run_cli("export", tmp_path / "run", tmp_path / "hf", "--format", "hf")
    assert r.returncode == 2 and "layers" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "hf").exists()


# ---------------------------------------------------------------- import
MAMBA_HF = dict(mamba_n_heads=4, mamba_d_head=16, mamba_n_groups=1, mamba_d_state=8, mamba_d_conv=4,
                mamba_expand=2, mamba_chunk_size=8)
COMMON_HF = dict(vocab_size=300, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                 max_position_embeddings=64, rms_norm_eps=1e-6, tie_word_embeddings=False, hidden_act="silu")


def hf_families():
    import transformers as T

    granite = dict(position_embedding_type="rope", attention_multiplier=8 ** -0.5,
                   layer_types=["mamba", "attention", "mamba", "mamba"], **MAMBA_HF, **COMMON_HF)
    return {
        "mamba2": T.Mamba2Config(num_heads=4, head_dim=16, state_size=8, expand=2, conv_kernel=4, n_groups=1,
                                 chunk_size=8, vocab_size=300, hidden_size=32, num_hidden_layers=2,
                                 layer_norm_epsilon=1e-6, tie_word_embeddings=True),
        "bamba": T.BambaConfig(intermediate_size=48, attn_layer_indices=[1, 3],
                               rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                "partial_rotary_factor": 1.0}, **MAMBA_HF, **COMMON_HF),
        "granite-moe": T.GraniteMoeHybridConfig(intermediate_size=24, shared_intermediate_size=0, num_local_experts=4,
                                                num_experts_per_tok=2, **granite),
        "granite-dense": T.GraniteMoeHybridConfig(intermediate_size=24, shared_intermediate_size=40,
                                                  num_local_experts=0, **granite),
    }


def save_hf(name, path, **changes):
    from transformers import AutoModelForCausalLM

    from test_import import tiny_tokenizer_dir

    cfg = hf_families()[name]
    for key, value in changes.items():
        setattr(cfg, key, value)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    for p in model.parameters():
        if p.numel():
            torch.nn.init.normal_(p, std=0.2) if p.dim() > 1 else torch.nn.init.uniform_(p, 0.5, 1.5)
    model.save_pretrained(path)
    tiny_tokenizer_dir(path)
    return model


@pytest.mark.parametrize("name", list(hf_families()))
def test_imported_hybrid_logits_and_greedy_decode_equal_transformers(tmp_path, name):
    from blueberry.runs.loading import load_model

    hf = save_hf(name, tmp_path / "hf")
    r = run_cli("import", tmp_path / "hf", tmp_path / "run")
    assert r.returncode == 0, r.stderr
    ours, config, _, _ = load_model(tmp_path / "run", "cpu")
    idx = torch.randint(0, 300, (2, 30))
    with torch.no_grad():
        assert (ours(idx).logits - hf(idx).logits).abs().max().item() <= 1e-4
        assert torch.equal(greedy_ours(ours, idx[:, :7], 5), greedy_theirs(hf, idx[:, :7], 5))


@pytest.mark.parametrize("layers,extra", [("mamba", {}), ("mamba:mlp,attn:mlp", {"n_kv_heads": 2}),
                                          ("attn:moe,mamba:moe", {"tie_embeddings": False})])
def test_import_of_an_exported_hybrid_is_the_run_exactly(tmp_path, layers, extra):
    from blueberry.data.tokenizer import train_bpe
    from blueberry.export import export_hf
    from blueberry.runs.loading import load_model

    _, model = random_model(layers, **extra)
    export_hf(model, train_bpe(["the king and the queen " * 30], 300), tmp_path / "hf")
    assert run_cli("import", tmp_path / "hf", tmp_path / "run", "--seq-len", "64").returncode == 0
    back, config, *_ = load_model(tmp_path / "run", "cpu")
    theirs = back.state_dict()
    assert set(theirs) == set(model.state_dict())
    for key, value in model.state_dict().items():
        assert torch.equal(value, theirs[key]), key


@pytest.mark.parametrize("name,field,value", [
    ("bamba", "rope_parameters", {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}),
    ("mamba2", "n_groups", 2),
    ("mamba2", "time_step_limit", [0.0, 0.1]),
    ("granite-moe", "shared_intermediate_size", 16),
    ("granite-moe", "residual_multiplier", 0.5),
    ("granite-moe", "attention_multiplier", 1.0),
])
def test_unrepresentable_hybrid_configs_are_refused_naming_the_field(tmp_path, name, field, value):
    save_hf(name, tmp_path / "hf")
    path = tmp_path / "hf" / "config.json"
    cfg = json.loads(path.read_text())
    cfg[field] = value
    path.write_text(json.dumps(cfg))
    r = run_cli("import", tmp_path / "hf", tmp_path / "run")
    assert r.returncode == 2 and field in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_cli_export_of_a_trained_hybrid_loads_in_transformers(tmp_path, corpus_dir):
    from transformers import AutoModelForCausalLM

    from blueberry.runs.loading import load_model

    r = run_cli("--dataset", corpus_dir, "--cache-dir", tmp_path / "c", "--out-dir", tmp_path / "run", "--max-steps",
                "1", "--eval-every", "1", "--no-compile", "--layers", "mamba:moe,attn:moe", "--no-qk-norm",
                "--ssm-state", "8", "--ssm-head-dim", "16", *TINY_FLAGS)
    assert r.returncode == 0, r.stderr
    r = run_cli("export", tmp_path / "run", tmp_path / "hf", "--format", "hf")
    assert r.returncode == 0, r.stderr
    ours, *_ = load_model(tmp_path / "run", "cpu")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", local_files_only=True, dtype=torch.float32).eval()
    assert type(hf).__name__ == "GraniteMoeHybridForCausalLM"
    idx = torch.randint(0, 300, (1, 20))
    with torch.no_grad():
        assert (ours(idx).logits - hf(idx).logits).abs().max().item() <= 1e-4
