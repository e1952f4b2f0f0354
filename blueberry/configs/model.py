"""`ModelConfig`: the architecture — all the model code ever sees of a run's settings."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError
from .fields import MLP_TYPES, MODEL_TYPES, check_choices, check_positive, check_range, setting
from .layer_pattern import DEFAULT_PATTERNS, STATEFUL_MIXERS, LayerSpec, describe, parse_layers


@dataclass
class ModelConfig:
    model_type: str = setting("moe", "moe: a Mixture of Experts in every block; standard: a dense MLP (default: "
                                     "standard on a CPU, where it trains best in the same time; moe on a GPU)",
                              choices=MODEL_TYPES)
    vocab_size: int | None = setting(None, "vocabulary size (default for a BPE trained here: 4096 on a "
                                           "CPU, 8192 on a GPU; the size of a given --tokenizer)")
    d_model: int | None = setting(None, "width of the residual stream")
    n_layers: int | None = setting(None, "number of blocks")
    n_heads: int | None = setting(None, "attention heads")
    n_kv_heads: int | None = setting(None, "key/value heads for grouped-query attention (default: n_heads)")
    head_dim: int | None = setting(None, "width of each attention head (default: d_model / n_heads; Qwen3 sets its own)",
                                   flag="attention_head_dim")
    qkv_bias: bool = setting(False, "biases on the query, key and value projections (Qwen2)")
    d_ff: int | None = setting(None, "hidden width of the MLP (and of each expert unless --moe-d-ff)")
    max_seq_len: int | None = setting(None, "training sequence length and context window", flag="seq_len")
    mlp_type: str = setting("swiglu", "feed-forward: gated SwiGLU, Linear-SiLU-Linear, or Linear-ReLU²-Linear "
                                      "(relu2, as in modded-nanogpt)", choices=MLP_TYPES)
    qk_norm: bool = setting(False, "RMSNorm on each head's queries and keys before RoPE (Qwen3; default: on)")
    tie_embeddings: bool = setting(True, "share the input embedding and the output head")
    rope_theta: float = setting(10000.0, "RoPE base frequency")
    norm_eps: float = setting(1e-5, "RMSNorm epsilon")
    dropout: float = setting(0.0, "dropout after attention and feed-forward")
    init_std: float = setting(0.02, "standard deviation of the initial weights")
    # ---- mixture of experts ----
    num_experts: int = setting(8, "experts per MoE layer")
    expert_top_k: int = setting(2, "experts each token is routed to", flag="experts_per_token", aliases=("top_k",))
    moe_d_ff: int | None = setting(None, "hidden width of each expert (default: d_ff)")
    capacity_factor: float = setting(0.0, "expert capacity in training, in multiples of a fair share (0: dropless)")
    load_balancing_weight: float = setting(0.01, "weight of the load-balancing loss N*sum(f*P)")
    router_z_loss_weight: float = setting(0.001, "weight of the router z-loss mean(logsumexp^2)")
    router_noise: float = setting(0.0, "std of Gaussian noise added to router logits in training")
    shared_expert: bool = setting(False, "add a sigmoid-gated shared expert every token passes (Qwen2-MoE)")
    # ---- the stack: mixers and feed-forwards per block ----
    layers: str | None = setting(None, "layer pattern, e.g. 'mamba:mlp*3,attn:mlp' or 'attn:mlp,mod(attn:mlp)' "
                                       "(mixers attn|mamba|retention, feed-forwards mlp|moe|none, tiled to "
                                       "n_layers; default: attn:moe for --model-type moe, attn:mlp for standard)")
    ssm_state: int = setting(64, "Mamba-2: state size N per head")
    ssm_head_dim: int = setting(64, "Mamba-2: channels per head P")
    ssm_expand: int = setting(2, "Mamba-2: inner width as a multiple of d_model")
    ssm_conv: int = setting(4, "Mamba-2: causal depthwise convolution width")
    scan_chunk: int = setting(64, "Mamba-2 and retention: chunk length of the chunked parallel scan")
    mod_capacity: float = setting(0.125, "Mixture-of-Depths: fraction of tokens a routed block processes")
    mod_aux_weight: float = setting(0.01, "Mixture-of-Depths: weight of the causal predictor's loss")

    @property
    def attention_head_dim(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    @property
    def layer_pattern(self) -> list[LayerSpec]:
        """The LayerSpec of every block (from --layers, else from model_type)."""
        return parse_layers(self.layers or DEFAULT_PATTERNS[self.model_type], self.n_layers)

    @property
    def architecture(self) -> str:
        """standard, moe, mamba, retention, mod or hybrid: a short name for logs and run names."""
        return self.model_type if self.layers is None else describe(self.layer_pattern)

    @property
    def stateful(self) -> bool:
        """Some block keeps a recurrent state (no KV cache to roll back)."""
        return any(s.mixer in STATEFUL_MIXERS for s in self.layer_pattern)

    @property
    def pads_independently(self) -> bool:
        """A prompt padded at its end keeps its logits and its cache below the padding: no recurrent state
        (it would carry the padding on) and no Mixture-of-Depths routing (it picks tokens per sequence)."""
        return not self.stateful and not any(s.mod for s in self.layer_pattern)

    @property
    def expert_d_ff(self) -> int:
        return self.moe_d_ff or self.d_ff

    def validate(self) -> "ModelConfig":
        check_positive(self, "vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "max_seq_len",
                       "num_experts", "expert_top_k")
        check_positive(self, "moe_d_ff", "head_dim", optional=True)
        check_choices(self)
        if self.head_dim is None and self.d_model % self.n_heads:
            raise ConfigError("d_model", f"must be divisible by n_heads ({self.d_model} % {self.n_heads} != 0)")
        if self.attention_head_dim % 2:
            raise ConfigError("d_model", f"the head width {self.attention_head_dim} must be even for rotary embeddings")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError("n_kv_heads", f"must divide n_heads ({self.n_heads}), got {self.n_kv_heads}")
        if self.expert_top_k > self.num_experts:
            raise ConfigError("expert_top_k", f"must be at most num_experts ({self.num_experts}), "
                              f"got {self.expert_top_k}")
        if self.vocab_size < 260:
            raise ConfigError("vocab_size", f"must be at least 260 (256 bytes + special tokens), got {self.vocab_size}")
        check_range(self, "dropout", 0.0, 0.9)
        check_range(self, "capacity_factor", 0.0, 64.0)
        check_range(self, "load_balancing_weight", 0.0, 100.0)
        check_range(self, "router_z_loss_weight", 0.0, 100.0)
        check_range(self, "router_noise", 0.0, 10.0)
        check_positive(self, "ssm_state", "ssm_head_dim", "ssm_expand", "ssm_conv", "scan_chunk")
        check_range(self, "mod_capacity", 0.0, 1.0, lo_open=True)
        check_range(self, "mod_aux_weight", 0.0, 100.0)
        try:
            pattern = self.layer_pattern
        except ValueError as e:
            raise ConfigError("layers", str(e)) from None
        if any(s.mixer == "mamba" for s in pattern) and (self.ssm_expand * self.d_model) % self.ssm_head_dim:
            raise ConfigError("ssm_head_dim", f"must divide the Mamba-2 inner width ssm_expand * d_model = "
                              f"{self.ssm_expand * self.d_model}, got {self.ssm_head_dim}")
        return self
