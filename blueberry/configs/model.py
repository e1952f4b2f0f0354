"""`ModelConfig`: the architecture — all the model code ever sees of a run's settings."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError
from .fields import MLP_TYPES, MODEL_TYPES, check_choices, check_positive, check_range, setting


@dataclass
class ModelConfig:
    model_type: str = setting("moe", "moe: a Mixture of Experts in every block; standard: a dense MLP",
                              choices=MODEL_TYPES)
    vocab_size: int | None = setting(None, "vocabulary size (default: 8192 for a BPE trained here, the size of "
                                           "a given --tokenizer)")
    d_model: int | None = setting(None, "width of the residual stream")
    n_layers: int | None = setting(None, "number of blocks")
    n_heads: int | None = setting(None, "attention heads")
    n_kv_heads: int | None = setting(None, "key/value heads for grouped-query attention (default: n_heads)")
    head_dim: int | None = setting(None, "width of each attention head (default: d_model / n_heads; Qwen3 sets its own)",
                                   flag="attention_head_dim")
    qkv_bias: bool = setting(False, "biases on the query, key and value projections (Qwen2)")
    d_ff: int | None = setting(None, "hidden width of the MLP (and of each expert unless --moe-d-ff)")
    max_seq_len: int | None = setting(None, "training sequence length and context window", flag="seq_len")
    mlp_type: str = setting("swiglu", "feed-forward: gated SwiGLU or Linear-SiLU-Linear", choices=MLP_TYPES)
    qk_norm: bool = setting(False, "RMSNorm on each head's queries and keys before RoPE (Qwen3)")
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

    @property
    def attention_head_dim(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

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
        return self
