"""Mamba-2 stacks and attention/Mamba-2 hybrids, to and from Hugging Face transformers.

Which stack maps exactly:
  every block `mamba` (no feed-forward)   -> Mamba2ForCausalLM            (one B/C group, the gated RMSNorm
                                                                          normalises y * silu(z), as ours)
  attn/mamba blocks, each with an MLP     -> BambaForCausalLM             (SwiGLU, RMSNorm before mixer and
                                                                          MLP; RoPE over the whole head:
                                                                          partial_rotary_factor 1)
  attn/mamba blocks, each with an MoE     -> GraniteMoeHybridForCausalLM  (embedding, residual and logits
                                                                          multipliers 1, attention scale
                                                                          1/sqrt(head_dim), shared MLP of width 0)
Refused, naming the setting: retention and Mixture-of-Depths blocks, a block without a feed-forward inside
a hybrid (both targets put a feed-forward after every mixer), MLP and MoE blocks in one stack, QK-norm,
q/k/v biases or a head_dim of its own in a hybrid's attention, a shared expert (Granite adds its shared
MLP ungated, ours is sigmoid-gated), a top-1 MoE (Granite renormalises one expert's weight to 1) and an
ungated MLP. On import the same conditions are checked on the transformers config.
"""

from __future__ import annotations

import math

import torch

MAMBA2, BAMBA, GRANITE = "Mamba2ForCausalLM", "BambaForCausalLM", "GraniteMoeHybridForCausalLM"
SSM_ARCHITECTURES = (MAMBA2, BAMBA, GRANITE)


def has_mamba(model) -> bool:
    """Whether the ModelConfig `model` has Mamba-2 blocks."""
    return any(s.mixer == "mamba" for s in model.layer_pattern)


def _refuse(field: str, why: str):
    from .refusals import ExportError

    raise ExportError(f"{field}: {why}")


def ssm_architecture(model) -> str:
    """The transformers class of a stack with Mamba-2 blocks (ExportError naming the setting otherwise)."""
    specs = model.layer_pattern
    mixers, ffns = {s.mixer for s in specs}, {s.ffn for s in specs}
    if any(s.mod for s in specs):
        _refuse("layers", "Mixture-of-Depths blocks (mod(...)) have no Hugging Face transformers equivalent")
    if "retention" in mixers:
        _refuse("layers", "retention blocks have no Hugging Face transformers equivalent")
    if ffns == {"none"} and mixers == {"mamba"}:
        return MAMBA2
    if "none" in ffns:
        _refuse("layers", f"{model.layers!r} has a block without a feed-forward inside a hybrid; Bamba and "
                          "GraniteMoeHybrid put an MLP (or an MoE) after every mixer")
    if ffns == {"mlp", "moe"}:
        _refuse("layers", "MLP and MoE blocks in one stack: GraniteMoeHybrid has an MoE in every layer or in none")
    if model.mlp_type != "swiglu":
        _refuse("mlp_type", f"{model.mlp_type!r} (an ungated feed-forward): Bamba and GraniteMoeHybrid use SwiGLU")
    if "attn" in mixers:
        if model.qk_norm:
            _refuse("qk_norm", "Bamba and GraniteMoeHybrid attention has no QK-norm (a hybrid to export is "
                               "trained with --no-qk-norm)")
        if model.qkv_bias:
            _refuse("qkv_bias", "Bamba and GraniteMoeHybrid have no q/k/v-only biases")
        if model.head_dim not in (None, model.d_model // model.n_heads):
            _refuse("head_dim", "Bamba and GraniteMoeHybrid attention heads are d_model / n_heads wide")
    if ffns == {"mlp"}:
        return BAMBA
    if model.shared_expert:
        _refuse("shared_expert", "GraniteMoeHybrid adds its shared MLP ungated; ours is sigmoid-gated")
    if model.expert_top_k == 1:
        _refuse("expert_top_k", "GraniteMoeHybrid renormalises a single expert's weight to 1; ours uses the "
                                "router probability")
    return GRANITE


def _mamba_sizes(model) -> dict:
    return dict(heads=model.ssm_expand * model.d_model // model.ssm_head_dim, head_dim=model.ssm_head_dim,
                state=model.ssm_state, conv=model.ssm_conv, expand=model.ssm_expand, chunk=model.scan_chunk)


def ssm_hf_config(model, arch: str, special: dict):
    """The transformers config of a Mamba-2 or hybrid stack (`model`: its ModelConfig); `special`: bos/eos/pad
    token ids."""
    import transformers as T

    m = _mamba_sizes(model)
    common = dict(**special, vocab_size=model.vocab_size, hidden_size=model.d_model,
                  num_hidden_layers=model.n_layers, tie_word_embeddings=model.tie_embeddings, hidden_act="silu",
                  architectures=[arch], dtype="float32")
    if arch == MAMBA2:
        return T.Mamba2Config(num_heads=m["heads"], head_dim=m["head_dim"], state_size=m["state"],
                              expand=m["expand"], conv_kernel=m["conv"], n_groups=1, chunk_size=m["chunk"],
                              use_bias=False, use_conv_bias=True, layer_norm_epsilon=model.norm_eps,
                              residual_in_fp32=True, **common)
    mamba = dict(mamba_n_heads=m["heads"], mamba_d_head=m["head_dim"], mamba_n_groups=1, mamba_d_state=m["state"],
                 mamba_d_conv=m["conv"], mamba_expand=m["expand"], mamba_chunk_size=m["chunk"],
                 mamba_conv_bias=True, mamba_proj_bias=False)
    attention = dict(num_attention_heads=model.n_heads, num_key_value_heads=model.n_kv_heads,
                     max_position_embeddings=model.max_seq_len, rms_norm_eps=model.norm_eps, attention_bias=False)
    rope = {"rope_type": "default", "rope_theta": model.rope_theta}
    specs = model.layer_pattern
    if arch == BAMBA:
        return T.BambaConfig(intermediate_size=model.d_ff, mlp_bias=False,
                             attn_layer_indices=[i for i, s in enumerate(specs) if s.mixer == "attn"],
                             rope_parameters={**rope, "partial_rotary_factor": 1.0}, **mamba, **attention, **common)
    return T.GraniteMoeHybridConfig(
        intermediate_size=model.expert_d_ff, shared_intermediate_size=0, num_local_experts=model.num_experts,
        num_experts_per_tok=model.expert_top_k, router_aux_loss_coef=model.load_balancing_weight,
        output_router_logits=False, layer_types=["attention" if s.mixer == "attn" else "mamba" for s in specs],
        position_embedding_type="rope", rope_parameters=rope, embedding_multiplier=1.0, logits_scaling=1.0,
        residual_multiplier=1.0, attention_multiplier=1.0 / math.sqrt(model.attention_head_dim),
        **mamba, **attention, **common)


_MAMBA_PARTS = {"conv.weight": "conv1d.weight", "conv.bias": "conv1d.bias"}
_FFN_NAMES = {
    BAMBA: {"ffn_norm.weight": "pre_ff_layernorm.weight", "ffn.gate.weight": "feed_forward.gate_proj.weight",
            "ffn.up.weight": "feed_forward.up_proj.weight", "ffn.down.weight": "feed_forward.down_proj.weight"},
    GRANITE: {"ffn_norm.weight": "post_attention_layernorm.weight",
              "ffn.router.weight": "block_sparse_moe.router.weight",
              "ffn.w_up": "block_sparse_moe.experts.gate_up_proj", "ffn.w_down": "block_sparse_moe.experts.down_proj"},
}
_TOP_NAMES = {
    MAMBA2: {"embed.weight": "backbone.embeddings.weight", "norm.weight": "backbone.norm_f.weight"},
    BAMBA: {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.final_layernorm.weight"},
    GRANITE: {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"},
}


def ssm_hf_name(name: str, arch: str) -> str:
    """The transformers name of our parameter `name` in `arch`."""
    from .refusals import ExportError

    if name == "lm_head.weight":
        return name
    if name in _TOP_NAMES[arch]:
        return _TOP_NAMES[arch][name]
    prefix, _, rest = name.partition(".")
    index, _, rest = rest.partition(".")
    if prefix == "blocks":
        layer = f"backbone.layers.{index}" if arch == MAMBA2 else f"model.layers.{index}"
        mixer, _, part = rest.partition(".")
        if rest in ("mamba_norm.weight", "attn_norm.weight"):
            return f"{layer}.{'norm' if arch == MAMBA2 else 'input_layernorm'}.weight"
        if mixer == "mamba":
            return f"{layer}.{'mixer' if arch == MAMBA2 else 'mamba'}.{_MAMBA_PARTS.get(part, part)}"
        if mixer == "attn" and part in ("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight"):
            return f"{layer}.self_attn.{part}"
        if rest in _FFN_NAMES.get(arch, {}):
            return f"{layer}.{_FFN_NAMES[arch][rest]}"
    raise ExportError(f"parameter {name} has no {arch} counterpart")


# ---------------------------------------------------------------- import: transformers -> Blueberry
def _check(cfg: dict, hf_dir, field: str, ok: bool, why: str) -> None:
    if not ok:
        from .refusals import ImportRefused

        raise ImportRefused(f"{hf_dir}: config field {field}={cfg.get(field)!r}: {why}")


def _number(x) -> float:
    """A float of config.json, where transformers writes infinity as {"__float__": "Infinity"}."""
    return float(x["__float__"]) if isinstance(x, dict) and "__float__" in x else float(x)


def _import_mamba_fields(cfg: dict, hf_dir, prefix: str) -> dict:
    """Our ssm_* fields from a Mamba-2 mixer's settings (`prefix`: "" for Mamba2, "mamba_" for the hybrids)."""
    key = (lambda name: prefix + name) if prefix else (lambda name: name)
    groups = cfg.get(key("n_groups"), 1)
    _check(cfg, hf_dir, key("n_groups"), groups == 1, "ours has one B/C group")
    conv_bias, proj_bias = ("use_conv_bias", "use_bias") if not prefix else ("mamba_conv_bias", "mamba_proj_bias")
    _check(cfg, hf_dir, conv_bias, cfg.get(conv_bias, True), "ours has a convolution bias")
    _check(cfg, hf_dir, proj_bias, not cfg.get(proj_bias, False), "ours has no in/out projection biases")
    limit = tuple(_number(x) for x in (cfg.get("time_step_limit") or (0.0, float("inf"))))
    _check(cfg, hf_dir, "time_step_limit", limit[0] == 0.0 and math.isinf(limit[1]), "ours does not clamp dt")
    _check(cfg, hf_dir, "hidden_act", cfg.get("hidden_act", "silu") == "silu", "ours uses SiLU")
    names = ("head_dim", "state_size", "expand", "conv_kernel", "chunk_size") if not prefix else \
        ("mamba_d_head", "mamba_d_state", "mamba_expand", "mamba_d_conv", "mamba_chunk_size")
    head_dim, state, expand, conv, chunk = (cfg[n] for n in names)
    _check(cfg, hf_dir, names[2], float(expand).is_integer(), "ours needs a whole-number expansion")
    return dict(ssm_head_dim=head_dim, ssm_state=state, ssm_expand=int(expand), ssm_conv=conv, scan_chunk=chunk)


def _import_attention_fields(cfg: dict, hf_dir) -> dict:
    rope = cfg.get("rope_parameters") or {}
    _check(cfg, hf_dir, "rope_parameters", (rope.get("rope_type") or "default") == "default",
           "only plain RoPE is implemented")
    _check(cfg, hf_dir, "rope_parameters", float(rope.get("partial_rotary_factor", 1.0)) == 1.0,
           "partial_rotary_factor: ours rotates the whole head")
    for field in ("attention_bias", "mlp_bias"):
        _check(cfg, hf_dir, field, not cfg.get(field), "biases on these projections are not implemented")
    heads = cfg["num_attention_heads"]
    return dict(n_heads=heads, n_kv_heads=cfg.get("num_key_value_heads") or heads,
                rope_theta=float(rope.get("rope_theta", 10000.0)), norm_eps=cfg.get("rms_norm_eps", 1e-5))


def _granite_layers(cfg: dict, hf_dir) -> tuple[list[str], dict]:
    """GraniteMoeHybrid's mixers and feed-forward: an MoE in every layer (shared MLP of width 0), or its
    shared MLP alone (no experts) as each layer's SwiGLU MLP."""
    for field in ("embedding_multiplier", "logits_scaling", "residual_multiplier"):
        _check(cfg, hf_dir, field, float(cfg.get(field, 1.0)) == 1.0, "ours has no such multiplier")
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    _check(cfg, hf_dir, "attention_multiplier", math.isclose(cfg.get("attention_multiplier", 1.0),
                                                             head_dim ** -0.5, rel_tol=1e-6),
           f"ours scales attention by 1/sqrt(head_dim) = {head_dim ** -0.5:g}")
    _check(cfg, hf_dir, "position_embedding_type", cfg.get("position_embedding_type") == "rope",
           "ours has RoPE in every attention layer")
    experts, shared = cfg.get("num_local_experts") or 0, cfg.get("shared_intermediate_size") or 0
    mixers = ["attn" if t in ("attention", "full_attention") else "mamba" for t in cfg["layer_types"]]
    if experts == 0:
        return [f"{m}:mlp" for m in mixers], dict(model_type="standard", d_ff=shared)
    _check(cfg, hf_dir, "shared_intermediate_size", shared == 0,
           "Granite adds its shared MLP ungated; ours is sigmoid-gated (only a width of 0 maps)")
    top_k = cfg["num_experts_per_tok"]
    _check(cfg, hf_dir, "num_experts_per_tok", top_k > 1, "Granite renormalises one expert's weight to 1; ours "
                                                          "uses the router probability")
    return [f"{m}:moe" for m in mixers], dict(
        model_type="moe", num_experts=experts, expert_top_k=top_k, moe_d_ff=cfg["intermediate_size"],
        d_ff=cfg["intermediate_size"], load_balancing_weight=float(cfg.get("router_aux_loss_coef", 0.01)))


def ssm_model_fields(cfg: dict, hf_dir, default_context: int) -> dict:
    """Our ModelConfig fields for a Mamba2, Bamba or GraniteMoeHybrid config.json (ImportRefused, naming
    the field, for a setting we cannot represent exactly)."""
    arch = cfg["architectures"][0]
    d_model, n_layers = cfg["hidden_size"], cfg["num_hidden_layers"]
    fields = dict(vocab_size=cfg["vocab_size"], d_model=d_model, n_layers=n_layers, mlp_type="swiglu",
                  tie_embeddings=bool(cfg.get("tie_word_embeddings", False)), qk_norm=False, qkv_bias=False,
                  head_dim=None, max_seq_len=min(cfg.get("max_position_embeddings", default_context), default_context))
    if arch == MAMBA2:
        return dict(fields, **_import_mamba_fields(cfg, hf_dir, ""), layers="mamba", model_type="standard",
                    n_heads=1, n_kv_heads=1, d_ff=d_model, norm_eps=cfg.get("layer_norm_epsilon", 1e-5))
    fields.update(_import_mamba_fields(cfg, hf_dir, "mamba_"), **_import_attention_fields(cfg, hf_dir))
    if arch == BAMBA:
        attn = set(cfg.get("attn_layer_indices") or ())
        layers = ["attn:mlp" if i in attn else "mamba:mlp" for i in range(n_layers)]
        return dict(fields, layers=",".join(layers), model_type="standard", d_ff=cfg["intermediate_size"])
    layers, ffn = _granite_layers(cfg, hf_dir)
    return dict(fields, layers=",".join(layers), **ffn)


def ssm_theirs_to_ours(model_config, arch: str) -> dict[str, str]:
    """transformers tensor name -> our parameter name, for every parameter of our model of `model_config`."""
    from ..models import create_model

    with torch.device("meta"):
        names = list(create_model(model_config).state_dict())
    out = {}
    for name in names:
        if arch == GRANITE and ".ffn." in name and not name.split(".ffn.")[1].startswith(("router", "w_")):
            continue  # the shared MLP used as each layer's MLP: split by `split_granite_mlp`
        out[ssm_hf_name(name, arch)] = name
    if arch == GRANITE:  # save_pretrained writes the experts under their original (on-disk) names
        for theirs, ours in list(out.items()):
            for loaded, saved in _GRANITE_SAVED_NAMES:
                if theirs.endswith(loaded):
                    out[theirs[: -len(loaded)] + saved] = ours
    return out


_GRANITE_SAVED_NAMES = (("block_sparse_moe.experts.gate_up_proj", "block_sparse_moe.input_linear.weight"),
                        ("block_sparse_moe.experts.down_proj", "block_sparse_moe.output_linear.weight"),
                        ("block_sparse_moe.router.weight", "block_sparse_moe.router.layer.weight"))


def split_granite_mlp(name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor] | None:
    """GraniteMoeHybrid's shared MLP as our SwiGLU's tensors (input_linear holds gate, then up); {} for the
    empty shared MLP beside experts; None if `name` is not a shared-MLP tensor."""
    parts = name.split(".")
    if len(parts) != 6 or parts[3] != "shared_mlp":
        return None
    if tensor.numel() == 0:
        return {}
    block = f"blocks.{parts[2]}.ffn"
    if parts[4] == "input_linear":
        gate, up = tensor.chunk(2, dim=0)
        return {f"{block}.gate.weight": gate, f"{block}.up.weight": up}
    return {f"{block}.down.weight": tensor}
