"""Export to a Hugging Face transformers directory that loads offline with AutoModelForCausalLM.

Which architecture maps exactly:
  dense                      -> LlamaForCausalLM         (SwiGLU MLP, RoPE, RMSNorm, GQA)
  dense + QK-norm            -> Qwen3ForCausalLM         (per-head RMSNorm on q and k before RoPE)
  MoE, top-k >= 2            -> MixtralForCausalLM       (softmax router, top-k renormalised)
  MoE + shared expert        -> Qwen2MoeForCausalLM      (sigmoid-gated shared SwiGLU expert)
  MoE + QK-norm              -> Qwen3MoeForCausalLM
(Qwen MoE routers renormalise the top-k weights only for k >= 2, as ours do.) Anything else (the
non-gated SiLU MLP, QK-norm with a shared expert, a top-1 MoE with neither, whose router weight Mixtral
would renormalise to 1) has no exact equivalent and is refused. Weights are copied by name into a freshly built HF model whose key set and shapes must match
ours one to one; the model is then saved with save_pretrained, the tokenizer alongside it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import UsageError


class ExportError(UsageError):
    pass


def hf_architecture(config) -> str:
    if config.mlp_type != "swiglu":
        raise ExportError(f"mlp_type={config.mlp_type!r} (Linear-SiLU-Linear) has no exact Hugging Face "
                          "equivalent; only SwiGLU models can be exported")
    if config.model_type == "standard":
        return "Qwen3ForCausalLM" if config.qk_norm else "LlamaForCausalLM"
    if config.shared_expert and config.qk_norm:
        raise ExportError("an MoE with both a shared expert and QK-norm has no exact Hugging Face equivalent")
    if config.shared_expert:
        return "Qwen2MoeForCausalLM"
    if config.qk_norm:
        return "Qwen3MoeForCausalLM"
    if config.expert_top_k == 1:
        raise ExportError("a top-1 MoE scales each expert by its router probability; Mixtral renormalises that "
                          "weight to 1, so it has no exact Hugging Face equivalent. Export needs --top-k 2 or "
                          "more, --shared-expert (Qwen2-MoE) or --qk-norm (Qwen3-MoE)")
    return "MixtralForCausalLM"


def hf_config(config, eot_id: int | None = None):
    """The transformers config of our model; `eot_id` (the tokenizer's end-of-text) becomes its bos, eos
    and pad token, so that `generate()` starts and stops where ours do."""
    import transformers as T

    arch = hf_architecture(config)
    special = {} if eot_id is None else dict(bos_token_id=eot_id, eos_token_id=eot_id, pad_token_id=eot_id)
    common = dict(**special,
        vocab_size=config.vocab_size, hidden_size=config.d_model, num_hidden_layers=config.n_layers,
        num_attention_heads=config.n_heads, num_key_value_heads=config.n_kv_heads,
        max_position_embeddings=config.max_seq_len, rms_norm_eps=config.norm_eps,
        tie_word_embeddings=config.tie_embeddings, hidden_act="silu",
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        architectures=[arch], dtype="float32",
    )
    moe = dict(num_experts_per_tok=config.expert_top_k, router_aux_loss_coef=config.load_balancing_weight,
               output_router_logits=False)
    if arch == "LlamaForCausalLM":
        return T.LlamaConfig(intermediate_size=config.d_ff, attention_bias=False, mlp_bias=False,
                             head_dim=config.head_dim, **common)
    if arch == "Qwen3ForCausalLM":
        return T.Qwen3Config(intermediate_size=config.d_ff, attention_bias=False, head_dim=config.head_dim,
                             use_sliding_window=False, **common)
    if arch == "MixtralForCausalLM":
        return T.MixtralConfig(intermediate_size=config.expert_d_ff, num_local_experts=config.num_experts,
                               sliding_window=None, head_dim=config.head_dim, **moe, **common)
    if arch == "Qwen2MoeForCausalLM":
        return T.Qwen2MoeConfig(intermediate_size=config.expert_d_ff, moe_intermediate_size=config.expert_d_ff,
                                shared_expert_intermediate_size=config.expert_d_ff, num_experts=config.num_experts,
                                norm_topk_prob=config.expert_top_k > 1, qkv_bias=False, decoder_sparse_step=1, mlp_only_layers=[],
                                use_sliding_window=False, **moe, **common)
    return T.Qwen3MoeConfig(intermediate_size=config.expert_d_ff, moe_intermediate_size=config.expert_d_ff,
                            num_experts=config.num_experts, norm_topk_prob=config.expert_top_k > 1, attention_bias=False,
                            head_dim=config.head_dim, decoder_sparse_step=1, mlp_only_layers=[],
                            use_sliding_window=False, **moe, **common)


_RENAMES = (
    ("embed.weight", "model.embed_tokens.weight"),
    ("norm.weight", "model.norm.weight"),
    ("lm_head.weight", "lm_head.weight"),
)
_BLOCK_RENAMES = (
    ("attn_norm.weight", "input_layernorm.weight"),
    ("ffn_norm.weight", "post_attention_layernorm.weight"),
    ("attn.q_proj.weight", "self_attn.q_proj.weight"),
    ("attn.k_proj.weight", "self_attn.k_proj.weight"),
    ("attn.v_proj.weight", "self_attn.v_proj.weight"),
    ("attn.o_proj.weight", "self_attn.o_proj.weight"),
    ("attn.q_norm.weight", "self_attn.q_norm.weight"),
    ("attn.k_norm.weight", "self_attn.k_norm.weight"),
    ("ffn.gate.weight", "mlp.gate_proj.weight"),
    ("ffn.up.weight", "mlp.up_proj.weight"),
    ("ffn.down.weight", "mlp.down_proj.weight"),
    ("ffn.router.weight", "mlp.gate.weight"),
    ("ffn.w_up", "mlp.experts.gate_up_proj"),
    ("ffn.w_down", "mlp.experts.down_proj"),
    ("ffn.shared.gate.weight", "mlp.shared_expert.gate_proj.weight"),
    ("ffn.shared.up.weight", "mlp.shared_expert.up_proj.weight"),
    ("ffn.shared.down.weight", "mlp.shared_expert.down_proj.weight"),
    ("ffn.shared_gate.weight", "mlp.shared_expert_gate.weight"),
)


def hf_name(name: str) -> str:
    for ours, theirs in _RENAMES:
        if name == ours:
            return theirs
    prefix, _, rest = name.partition(".")
    index, _, rest = rest.partition(".")
    if prefix == "blocks":
        for ours, theirs in _BLOCK_RENAMES:
            if rest == ours:
                return f"model.layers.{index}.{theirs}"
    raise ExportError(f"parameter {name} has no Hugging Face counterpart")


def to_hf_model(model, eot_id: int | None = None):
    """A transformers model holding exactly our weights (fp32), with our end-of-text as its special tokens."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    cfg = hf_config(model.config, eot_id)
    hf = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    if eot_id is not None:
        hf.generation_config = GenerationConfig(bos_token_id=eot_id, eos_token_id=eot_id, pad_token_id=eot_id)
    theirs = hf.state_dict()
    ours = {hf_name(k): v.detach().float().cpu() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        ours.pop("lm_head.weight", None)
        theirs = {k: v for k, v in theirs.items() if k != "lm_head.weight"}
    missing, extra = sorted(set(theirs) - set(ours)), sorted(set(ours) - set(theirs))
    bad = [f"{k}: ours {tuple(ours[k].shape)} vs {tuple(theirs[k].shape)}" for k in ours
           if k in theirs and ours[k].shape != theirs[k].shape]
    if missing or extra or bad:
        raise ExportError(f"{type(hf).__name__} does not map one to one: missing {missing[:5]}, "
                          f"extra {extra[:5]}, shape mismatches {bad[:5]}")
    hf.load_state_dict(ours, strict=False)
    if model.config.tie_embeddings:
        hf.tie_weights()
    return hf.eval()


def export_hf(model, tokenizer, out_dir: str | Path) -> Path:
    """Write `model` and its tokenizer (a blueberry Tokenizer) as a transformers directory."""
    from transformers import PreTrainedTokenizerFast

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise ExportError(f"{out} exists and is not empty; choose a new output directory")
    hf = to_hf_model(model, tokenizer.eot_id)
    out.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(out)
    if hasattr(tokenizer, "auto"):  # a transformers tokenizer: saved as it is
        tokenizer.auto.save_pretrained(out)
        return out
    eot = tokenizer.hf.id_to_token(tokenizer.eot_id)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer.hf, eos_token=eot, bos_token=eot, pad_token=eot,
                                   unk_token=None)
    fast.save_pretrained(out)
    return out
