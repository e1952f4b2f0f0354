"""Export to a Hugging Face transformers directory that loads offline with AutoModelForCausalLM.

Which architecture maps exactly:
  dense                      -> LlamaForCausalLM         (SwiGLU MLP, RoPE, RMSNorm, GQA)
  dense + QK-norm            -> Qwen3ForCausalLM         (per-head RMSNorm on q and k before RoPE)
  MoE, top-k >= 2            -> MixtralForCausalLM       (softmax router, top-k renormalised)
  MoE + shared expert        -> Qwen2MoeForCausalLM      (sigmoid-gated shared SwiGLU expert)
  MoE + QK-norm              -> Qwen3MoeForCausalLM
(Qwen MoE routers renormalise the top-k weights only for k >= 2, as ours do.) Anything else (the
non-gated SiLU MLP, QK-norm with a shared expert, a top-1 MoE with neither, whose router weight Mixtral
would renormalise to 1) has no exact equivalent and is refused. Stacks with Mamba-2 blocks (Mamba2, Bamba,
GraniteMoeHybrid) are mapped in hf_hybrid.py. Weights are copied by name into a freshly built HF model whose key set and shapes must match
ours one to one; the model is then saved with save_pretrained, the tokenizer alongside it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .refusals import ExportError, ImportRefused
from .hf_hybrid import (SSM_ARCHITECTURES, has_mamba, split_granite_mlp, ssm_architecture, ssm_hf_config,
                        ssm_hf_name, ssm_model_fields, ssm_theirs_to_ours)


def _stack_kind(model) -> str:
    """standard or moe: the two stacks transformers can represent exactly (ExportError for the others)."""
    blocks = {str(s) for s in model.layer_pattern}
    if blocks == {"attn:mlp"}:
        return "standard"
    if blocks == {"attn:moe"}:
        return "moe"
    raise ExportError(f"the layer pattern {model.layers!r} has no Hugging Face transformers equivalent: export "
                      "supports attention blocks with an MLP (or an MoE) in every layer, Mamba-2 stacks and "
                      "attention/Mamba-2 hybrids")


def hf_architecture(config) -> str:
    """The transformers class computing exactly the model of ModelConfig `config` (ExportError otherwise)."""
    if has_mamba(config):
        return ssm_architecture(config)
    kind = _stack_kind(config)
    if config.mlp_type != "swiglu":
        raise ExportError(f"mlp_type={config.mlp_type!r} (an ungated feed-forward) has no exact Hugging Face "
                          "equivalent; only SwiGLU models can be exported")
    if config.qkv_bias and not (kind == "moe" and config.shared_expert and not config.qk_norm):
        raise ExportError("query/key/value biases are carried by Qwen2-MoE (an MoE with a shared expert) only")
    if kind == "standard":
        return "Qwen3ForCausalLM" if config.qk_norm else "LlamaForCausalLM"
    if config.shared_expert and config.qk_norm:
        raise ExportError("an MoE with both a shared expert and QK-norm has no exact Hugging Face equivalent")
    if config.shared_expert:
        if config.head_dim not in (None, config.d_model // config.n_heads):
            raise ExportError("Qwen2-MoE has no head_dim of its own: export needs head_dim = d_model / n_heads")
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
    if arch in SSM_ARCHITECTURES:
        return ssm_hf_config(config, arch, special)
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
                             head_dim=config.attention_head_dim, **common)
    if arch == "Qwen3ForCausalLM":
        return T.Qwen3Config(intermediate_size=config.d_ff, attention_bias=False, head_dim=config.attention_head_dim,
                             use_sliding_window=False, **common)
    if arch == "MixtralForCausalLM":
        return T.MixtralConfig(intermediate_size=config.expert_d_ff, num_local_experts=config.num_experts,
                               sliding_window=None, head_dim=config.attention_head_dim, **moe, **common)
    if arch == "Qwen2MoeForCausalLM":
        return T.Qwen2MoeConfig(intermediate_size=config.expert_d_ff, moe_intermediate_size=config.expert_d_ff,
                                shared_expert_intermediate_size=config.expert_d_ff, num_experts=config.num_experts,
                                norm_topk_prob=config.expert_top_k > 1, qkv_bias=config.qkv_bias, decoder_sparse_step=1, mlp_only_layers=[],
                                use_sliding_window=False, **moe, **common)
    return T.Qwen3MoeConfig(intermediate_size=config.expert_d_ff, moe_intermediate_size=config.expert_d_ff,
                            num_experts=config.num_experts, norm_topk_prob=config.expert_top_k > 1, attention_bias=False,
                            head_dim=config.attention_head_dim, decoder_sparse_step=1, mlp_only_layers=[],
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
    ("attn.q_proj.bias", "self_attn.q_proj.bias"),
    ("attn.k_proj.bias", "self_attn.k_proj.bias"),
    ("attn.v_proj.bias", "self_attn.v_proj.bias"),
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
    arch = cfg.architectures[0]
    rename = (lambda k: ssm_hf_name(k, arch)) if arch in SSM_ARCHITECTURES else hf_name
    ours = {rename(k): v.detach().float().cpu() for k, v in model.state_dict().items()}
    ours.update({k: v for k, v in theirs.items() if v.numel() == 0})  # GraniteMoeHybrid's empty shared MLP
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


def export_hf(model, tokenizer, out_dir: str | Path, run_dir: str | Path | None = None, license: str = "mit",
              repo: str | None = None) -> Path:
    """Write `model` and its tokenizer (a blueberry Tokenizer) as a transformers directory: with the chat
    template `chat_prompt_ids` renders (in the tokenizer's config) and a model card README.md drawn from
    `run_dir` (export/model_card.py)."""
    from transformers import PreTrainedTokenizerFast

    from ..atomic import atomic_write_text
    from ..data.chat_template import jinja_chat_template
    from .model_card import model_card

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise ExportError(f"{out} exists and is not empty; choose a new output directory")
    hf = to_hf_model(model, tokenizer.eot_id)
    from ..atomic import building_dir

    with building_dir(out) as tmp:  # built under a temporary name, renamed when complete: a kill leaves no half
        hf.save_pretrained(tmp)
        if hasattr(tokenizer, "auto"):  # a transformers tokenizer: saved as it is, with a template if it had none
            original = tokenizer.auto.chat_template
            tokenizer.auto.chat_template = jinja_chat_template(tokenizer)
            try:
                tokenizer.auto.save_pretrained(tmp, save_jinja_files=False)
            finally:
                tokenizer.auto.chat_template = original
        else:
            eot = tokenizer.hf.id_to_token(tokenizer.eot_id)
            fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer.hf, eos_token=eot, bos_token=eot,
                                           pad_token=eot, unk_token=None)
            fast.chat_template = jinja_chat_template(tokenizer)
            fast.save_pretrained(tmp, save_jinja_files=False)  # the template inside tokenizer_config.json
        card = model_card(run_dir, type(hf).__name__, model.parameter_report(), license, repo=repo)
        atomic_write_text(Path(tmp) / "README.md", card)
    return out


# ---------------------------------------------------------------- import: Hugging Face -> Blueberry
IMPORTABLE = ("LlamaForCausalLM", "Qwen3ForCausalLM", "MixtralForCausalLM", "Qwen2MoeForCausalLM",
              "Qwen3MoeForCausalLM", *SSM_ARCHITECTURES)
DEFAULT_IMPORT_CONTEXT = 4096  # the window an import starts with unless --seq-len says otherwise


def is_hf_dir(path) -> bool:
    p = Path(path)
    return (p / "config.json").is_file() and "architectures" in (p / "config.json").read_text(encoding="utf-8")


def model_fields_from_hf(hf_dir) -> dict:
    """Our ModelConfig fields for a transformers checkpoint; a setting we cannot represent exactly is
    refused with a message naming the field."""
    import json

    cfg = json.loads((Path(hf_dir) / "config.json").read_text(encoding="utf-8"))
    arch = (cfg.get("architectures") or ["?"])[0]
    if arch not in IMPORTABLE:
        raise ImportRefused(f"{hf_dir}: architecture {arch} is not importable; supported: {', '.join(IMPORTABLE)}")
    if arch in SSM_ARCHITECTURES:
        return ssm_model_fields(cfg, hf_dir, DEFAULT_IMPORT_CONTEXT)

    def refuse(field, why):
        raise ImportRefused(f"{hf_dir}: config field {field}={cfg.get(field)!r}: {why}")

    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if (rope.get("rope_type") or rope.get("type") or "default") != "default":
        refuse("rope_parameters" if "rope_parameters" in cfg else "rope_scaling",
               "only plain RoPE is implemented (no YaRN/linear/dynamic/llama3 scaling)")
    if cfg.get("hidden_act", "silu") != "silu":
        refuse("hidden_act", "the MLP is SwiGLU (silu)")
    for field in ("attention_bias", "mlp_bias"):
        if cfg.get(field):
            refuse(field, "biases on these projections are not implemented")
    if cfg.get("use_sliding_window") or (arch == "MixtralForCausalLM" and cfg.get("sliding_window")):
        refuse("sliding_window", "sliding-window attention is not implemented")
    heads = cfg["num_attention_heads"]
    fields = dict(
        vocab_size=cfg["vocab_size"], d_model=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"], n_heads=heads,
        n_kv_heads=cfg.get("num_key_value_heads") or heads, max_seq_len=min(cfg.get("max_position_embeddings", 2048),
                                                                            DEFAULT_IMPORT_CONTEXT),
        rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))), norm_eps=cfg.get("rms_norm_eps", 1e-6),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)), mlp_type="swiglu",
        head_dim=cfg.get("head_dim") if cfg.get("head_dim") not in (None, cfg["hidden_size"] // heads) else None,
        qk_norm=arch in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM"), qkv_bias=bool(cfg.get("qkv_bias", False)),
    )
    if arch in ("LlamaForCausalLM", "Qwen3ForCausalLM"):
        return dict(fields, model_type="standard", d_ff=cfg["intermediate_size"])
    top_k = cfg["num_experts_per_tok"]
    experts = cfg.get("num_local_experts") or cfg.get("num_experts")
    if arch == "MixtralForCausalLM":
        if top_k == 1:
            refuse("num_experts_per_tok", "Mixtral renormalises a single expert's weight to 1; ours uses the router "
                                          "probability (Switch)")
        moe_d_ff = cfg["intermediate_size"]
    else:
        if bool(cfg.get("norm_topk_prob", False)) != (top_k > 1):
            refuse("norm_topk_prob", f"ours renormalises the top-k weights exactly when k > 1 (k = {top_k})")
        if cfg.get("decoder_sparse_step", 1) != 1 or cfg.get("mlp_only_layers"):
            refuse("decoder_sparse_step" if cfg.get("decoder_sparse_step", 1) != 1 else "mlp_only_layers",
                   "every layer must be an MoE layer")
        moe_d_ff = cfg["moe_intermediate_size"]
    shared = arch == "Qwen2MoeForCausalLM"
    if shared and cfg.get("shared_expert_intermediate_size") != moe_d_ff:
        refuse("shared_expert_intermediate_size", f"the shared expert must be as wide as the others ({moe_d_ff})")
    return dict(fields, model_type="moe", num_experts=experts, expert_top_k=top_k, moe_d_ff=moe_d_ff,
                d_ff=moe_d_ff, shared_expert=shared,
                load_balancing_weight=float(cfg.get("router_aux_loss_coef", 0.01)))


def _checkpoint_files(hf_dir) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it (a single file, or the shards of an index)."""
    import json

    root = Path(hf_dir)
    index = root / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return {name: root / file for name, file in weight_map.items()}
    single = root / "model.safetensors"
    if not single.is_file():
        raise ImportRefused(f"{hf_dir} has no model.safetensors (or .index.json); save it with save_pretrained")
    from safetensors import safe_open

    with safe_open(str(single), framework="pt") as f:
        return {name: single for name in f.keys()}


_EXPERT_PARTS = {"w1": "gate", "w3": "up", "w2": "down", "gate_proj": "gate", "up_proj": "up", "down_proj": "down"}


def read_hf_weights(hf_dir, model_config, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """Our state dict from the checkpoint's safetensors, read one tensor at a time (the checkpoint is
    never in memory twice): per-expert weights (Mixtral's w1/w2/w3, Qwen's gate/up/down_proj) or
    transformers' fused gate_up_proj/down_proj are stacked into our (E, 2F, D) / (E, D, F) tensors."""
    import re

    from safetensors import safe_open

    import json

    arch = (json.loads((Path(hf_dir) / "config.json").read_text(encoding="utf-8")).get("architectures") or ["?"])[0]
    theirs_to_ours = {}
    for i in range(model_config.n_layers):
        for ours, theirs in _BLOCK_RENAMES:
            theirs_to_ours[f"model.layers.{i}.{theirs}"] = f"blocks.{i}.{ours}"
    theirs_to_ours.update({theirs: ours for ours, theirs in _RENAMES})
    if arch in SSM_ARCHITECTURES:
        theirs_to_ours = ssm_theirs_to_ours(model_config, arch)
    expert = re.compile(r"model\.layers\.(\d+)\.(?:block_sparse_moe|mlp)\.experts\.(\d+)\.(\w+)\.weight$")
    router = re.compile(r"model\.layers\.(\d+)\.block_sparse_moe\.gate\.weight$")
    out, pieces, handles = {}, {}, {}
    for name, file in _checkpoint_files(hf_dir).items():
        if file not in handles:
            handles[file] = safe_open(str(file), framework="pt")
        tensor = handles[file].get_tensor(name).to(dtype)
        if m := expert.match(name):
            pieces[(int(m[1]), int(m[2]), _EXPERT_PARTS.get(m[3], m[3]))] = tensor
        elif m := router.match(name):
            out[f"blocks.{m[1]}.ffn.router.weight"] = tensor
        elif name in theirs_to_ours:
            out[theirs_to_ours[name]] = tensor
        elif arch == "GraniteMoeHybridForCausalLM" and (split := split_granite_mlp(name, tensor)) is not None:
            out.update(split)
        elif name.endswith("rotary_emb.inv_freq"):
            continue
        else:
            raise ImportRefused(f"{hf_dir}: tensor {name} has no counterpart in our model")
    for layer in range(model_config.n_layers):
        n = model_config.num_experts
        if (layer, 0, "gate") in pieces:
            out[f"blocks.{layer}.ffn.w_up"] = torch.stack(
                [torch.cat([pieces.pop((layer, e, "gate")), pieces.pop((layer, e, "up"))]) for e in range(n)])
            out[f"blocks.{layer}.ffn.w_down"] = torch.stack([pieces.pop((layer, e, "down")) for e in range(n)])
    if model_config.tie_embeddings:
        out.pop("lm_head.weight", None)
    return out
