"""Exported models must give our logits in Hugging Face transformers, loaded offline from disk."""

import pytest
import torch

from blueberry.configs import AdaptiveMoEModelConfig
from blueberry.data.tokenizer import train_bpe
from blueberry.export import ExportError, export_hf, hf_architecture
from blueberry.models import create_model

CASES = [
    dict(model_type="standard"),
    dict(model_type="standard", n_kv_heads=2, tie_embeddings=False),
    dict(model_type="standard", qk_norm=True, n_kv_heads=1),
    dict(model_type="moe"),
    dict(model_type="moe", n_kv_heads=2, expert_top_k=1, shared_expert=True, tie_embeddings=False),
    dict(model_type="moe", shared_expert=True),
    dict(model_type="moe", qk_norm=True),
    dict(model_type="moe", qk_norm=True, expert_top_k=1),
]


@pytest.mark.parametrize("kw", CASES)
def test_exported_logits_match(tmp_path, kw):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = AdaptiveMoEModelConfig(d_model=32, n_layers=2, n_heads=4, d_ff=48, max_seq_len=32, vocab_size=300,
                                 num_experts=4, device="cpu", use_fp8=False, **{"qk_norm": False, **kw}).validate()
    model = create_model(cfg).eval()
    for p in model.parameters():  # random, non-trivial weights everywhere (norm gains too)
        torch.nn.init.normal_(p, std=0.3) if p.dim() > 1 else torch.nn.init.uniform_(p, 0.5, 1.5)
    tok = train_bpe(["the quick brown fox jumps over the lazy dog " * 20], 300)
    tok.save(tmp_path / "tokenizer.json")
    out = export_hf(model, tok, tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(out, local_files_only=True, dtype=torch.float32).eval()
    assert type(hf).__name__ == hf_architecture(cfg.model)
    idx = torch.randint(0, 300, (2, 24))
    with torch.no_grad():
        ours, theirs = model(idx).logits, hf(idx).logits
    assert (ours - theirs).abs().max().item() <= 1e-4
    hf_tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert hf_tok.encode("the lazy dog", add_special_tokens=False) == tok.encode("the lazy dog")


def test_unmappable_options_are_refused(tmp_path):
    cfg = AdaptiveMoEModelConfig(d_model=32, n_layers=1, n_heads=4, max_seq_len=16, vocab_size=300,
                                 mlp_type="silu", device="cpu", use_fp8=False).validate()
    with pytest.raises(ExportError, match="no exact Hugging Face"):
        hf_architecture(cfg.model)
    top1 = AdaptiveMoEModelConfig(model_type="moe", d_model=32, n_layers=1, n_heads=4, max_seq_len=16,
                                  vocab_size=300, expert_top_k=1, qk_norm=False, device="cpu",
                                  use_fp8=False).validate()
    with pytest.raises(ExportError, match="top-1 MoE"):  # Mixtral would renormalise its weight to 1
        hf_architecture(top1.model)
