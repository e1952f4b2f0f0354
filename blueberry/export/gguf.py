"""Export to one GGUF file, the format llama.cpp (and Ollama, LM Studio, llama-cpp-python) runs.

Written with the `gguf` package that llama.cpp publishes (pip install 'blueberry[gguf]'). Each stack goes
to the llama.cpp architecture whose graph computes exactly our function:

  dense                           -> llama     (q/k rows permuted to llama.cpp's interleaved RoPE layout)
  dense + QK-norm                 -> qwen3     (rotate-half RoPE, as ours: no permutation)
  MoE, top-k >= 2                 -> llama with expert tensors (Mixtral: softmax router, top-k renormalised)
  MoE + QK-norm, top-k >= 2       -> qwen3moe  (always renormalises the top-k weights)
  MoE + shared expert, top-1      -> qwen2moe  (never renormalises: the weight is the router probability)

Refused, naming the field: the ungated MLPs, Mamba-2, retention, Mixture-of-Depths and hybrid stacks, QK-norm
with a shared expert, a top-1 MoE without a shared expert (llama and qwen3moe renormalise its single weight to
1; qwen2moe requires a shared expert, and an all-zero one is no way out: llama.cpp computes its sigmoid gate
as silu(g) / g, NaN at g = 0), a shared expert with top-k >= 2 (qwen2moe would not renormalise the weights ours
renormalise), q/k/v biases outside qwen2moe.

The output head is always written as `output.weight` (a tied model writes its embedding twice: some of
these graphs require it). Norm weights and routers stay f32 whatever --gguf-type; a matrix whose rows are
not a multiple of q8_0's 32-value block is written f16, as llama.cpp's own converter does. The tokenizer
goes in as llama.cpp's `gpt2` BPE (tokens, types, merges, special ids, the pre-tokenizer that splits as
ours), with the chat template.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .refusals import ExportError

GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")


def gguf_architecture(config) -> str:
    """llama, qwen3, qwen2moe or qwen3moe: the llama.cpp architecture computing exactly our model (`config`: its
    ModelConfig)."""
    blocks = {str(s) for s in config.layer_pattern}
    if blocks not in ({"attn:mlp"}, {"attn:moe"}):
        raise ExportError(f"layers={config.layers!r}: the stack {sorted(blocks)} has no llama.cpp equivalent; GGUF "
                          "export supports attention with an MLP (or an MoE) in every layer")
    if config.mlp_type != "swiglu":
        raise ExportError(f"mlp_type={config.mlp_type!r}: an ungated feed-forward has no llama.cpp equivalent")
    if blocks == {"attn:mlp"}:
        arch = "qwen3" if config.qk_norm else "llama"
    elif config.qk_norm:
        if config.shared_expert:
            raise ExportError("qk_norm with shared_expert: no llama.cpp architecture has both")
        if config.expert_top_k == 1:
            raise ExportError("expert_top_k=1 with qk_norm: llama.cpp's qwen3moe renormalises a single expert's "
                              "weight to 1, ours keeps the router probability")
        arch = "qwen3moe"
    elif config.shared_expert and config.expert_top_k > 1:
        raise ExportError(f"expert_top_k={config.expert_top_k} with shared_expert: llama.cpp's qwen2moe does not "
                          "renormalise the top-k weights, ours do")
    elif config.expert_top_k == 1 and not config.shared_expert:
        raise ExportError("expert_top_k=1: llama.cpp's llama and qwen3moe renormalise a single expert's weight to "
                          "1, ours keeps the router probability (qwen2moe keeps it, with --shared-expert)")
    else:
        arch = "qwen2moe" if config.shared_expert else "llama"
    if arch == "qwen2moe" and config.head_dim not in (None, config.d_model // config.n_heads):
        raise ExportError("head_dim: llama.cpp's qwen2moe needs head_dim = d_model / n_heads")
    if config.qkv_bias and arch != "qwen2moe":
        raise ExportError(f"qkv_bias: q/k/v biases are exported to qwen2moe only (this model maps to {arch})")
    return arch


def _permute_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """Rotate-half RoPE rows to llama.cpp's interleaved layout (convert_hf_to_gguf's LlamaModel.permute)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_BLOCK_NAMES = {
    "attn_norm.weight": "attn_norm.weight", "ffn_norm.weight": "ffn_norm.weight",
    "attn.q_proj.weight": "attn_q.weight", "attn.k_proj.weight": "attn_k.weight",
    "attn.v_proj.weight": "attn_v.weight", "attn.o_proj.weight": "attn_output.weight",
    "attn.q_proj.bias": "attn_q.bias", "attn.k_proj.bias": "attn_k.bias", "attn.v_proj.bias": "attn_v.bias",
    "attn.q_norm.weight": "attn_q_norm.weight", "attn.k_norm.weight": "attn_k_norm.weight",
    "ffn.gate.weight": "ffn_gate.weight", "ffn.up.weight": "ffn_up.weight", "ffn.down.weight": "ffn_down.weight",
    "ffn.router.weight": "ffn_gate_inp.weight", "ffn.w_down": "ffn_down_exps.weight",
    "ffn.shared.gate.weight": "ffn_gate_shexp.weight", "ffn.shared.up.weight": "ffn_up_shexp.weight",
    "ffn.shared.down.weight": "ffn_down_shexp.weight", "ffn.shared_gate.weight": "ffn_gate_inp_shexp.weight",
}
_TOP_NAMES = {"embed.weight": "token_embd.weight", "norm.weight": "output_norm.weight"}


def gguf_tensors(model, arch: str) -> dict[str, np.ndarray]:
    """Our weights as fp32 arrays under llama.cpp's tensor names (numpy shapes: GGUF reverses them)."""
    config = model.config
    heads, kv_heads = config.n_heads, config.n_kv_heads or config.n_heads
    out: dict[str, np.ndarray] = {}
    for name, tensor in model.state_dict().items():
        w = tensor.detach().float().cpu().numpy()
        if name in _TOP_NAMES:
            out[_TOP_NAMES[name]] = w
            continue
        if name == "lm_head.weight":
            continue
        prefix, index, rest = name.split(".", 2) if name.startswith("blocks.") else ("", "", name)
        if rest == "ffn.w_up":  # (E, 2F, D), gate rows first
            out[f"blk.{index}.ffn_gate_exps.weight"], out[f"blk.{index}.ffn_up_exps.weight"] = np.split(w, 2, axis=1)
            continue
        if prefix != "blocks" or rest not in _BLOCK_NAMES:
            raise ExportError(f"parameter {name} has no llama.cpp counterpart")
        if arch == "llama" and rest in ("attn.q_proj.weight", "attn.k_proj.weight"):
            w = _permute_rows(w, heads if rest.startswith("attn.q") else kv_heads)
        if rest == "ffn.shared_gate.weight":
            w = w.reshape(-1)
        out[f"blk.{index}.{_BLOCK_NAMES[rest]}"] = w
    out["output.weight"] = model.lm_head.weight.detach().float().cpu().numpy()
    return out


def _encoded(name: str, w: np.ndarray, gguf_type: str):
    """(data, raw_dtype or None) for GGUFWriter.add_tensor: vectors and routers stay f32."""
    from gguf import GGMLQuantizationType as Q, quants

    if gguf_type == "f32" or w.ndim == 1 or "ffn_gate_inp" in name:
        return w.astype(np.float32), None
    if gguf_type == "q8_0" and w.shape[-1] % 32 == 0:
        return quants.quantize(w, Q.Q8_0), Q.Q8_0
    if gguf_type == "bf16":
        return quants.quantize(w, Q.BF16), Q.BF16
    return w.astype(np.float16), None


def _file_type(gguf_type: str) -> int:
    from gguf import LlamaFileType as T

    return {"f32": T.ALL_F32, "f16": T.MOSTLY_F16, "bf16": T.MOSTLY_BF16, "q8_0": T.MOSTLY_Q8_0}[gguf_type]


def _add_hyperparameters(writer, config, arch: str, vocab_size: int) -> None:
    head_dim = config.attention_head_dim
    writer.add_vocab_size(vocab_size)
    writer.add_context_length(config.max_seq_len)
    writer.add_embedding_length(config.d_model)
    writer.add_block_count(config.n_layers)
    writer.add_head_count(config.n_heads)
    writer.add_head_count_kv(config.n_kv_heads or config.n_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(config.rope_theta))
    writer.add_layer_norm_rms_eps(float(config.norm_eps))
    moe = {str(s) for s in config.layer_pattern} == {"attn:moe"}
    writer.add_feed_forward_length(config.expert_d_ff if moe else config.d_ff)
    if moe:
        writer.add_expert_count(config.num_experts)
        writer.add_expert_used_count(config.expert_top_k)
        writer.add_expert_feed_forward_length(config.expert_d_ff)
    if arch == "qwen2moe":
        writer.add_expert_shared_feed_forward_length(config.expert_d_ff)


def export_gguf(model, tokenizer, out_path: str | Path, gguf_type: str = "f16", name: str | None = None,
                license: str | None = None, chat_template: str | None = None) -> Path:
    """Write `model` and its tokenizer as the GGUF file `out_path` (written under a temporary name, then
    renamed: a kill leaves no half file)."""
    import os

    from ..extras import require
    from .gguf_vocab import add_vocab

    gguf = require("gguf", "gguf", "GGUF export")
    if gguf_type not in GGUF_TYPES:
        raise ExportError(f"--gguf-type {gguf_type!r}: choose one of {', '.join(GGUF_TYPES)}")
    out = Path(out_path)
    if out.exists():
        raise ExportError(f"{out} exists; choose a new output file")
    arch = gguf_architecture(model.config)
    tensors = gguf_tensors(model, arch)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    writer = gguf.GGUFWriter(str(tmp), arch)
    try:
        writer.add_name(name or out.stem)
        if license:
            writer.add_license(license)
        writer.add_file_type(_file_type(gguf_type))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _add_hyperparameters(writer, model.config, arch, model.config.vocab_size)
        add_vocab(writer, tokenizer, model.config.vocab_size, chat_template)
        for tensor_name, w in tensors.items():
            data, raw_dtype = _encoded(tensor_name, w, gguf_type)
            writer.add_tensor(tensor_name, data, raw_dtype=raw_dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out

