"""`AdaptiveMoEModelConfig`: every setting of a run, with defaults taken from the detected hardware.

A field left as None is "auto": `__post_init__` fills it from the capabilities of the chosen device and
records its name in `auto_fields`. A field the user set is never changed; `validate()` checks every
field against its allowed range and raises `ConfigError` naming the field.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ..errors import ConfigError
from ..system import Capabilities, detect_capabilities

MODEL_TYPES = ("moe", "standard")
MLP_TYPES = ("swiglu", "silu")
DATASET_TYPES = ("packed", "text_token", "random_chunk", "document")
OPTIMIZERS = ("muon", "adamw", "lion", "adafactor")
SCHEDULES = ("cosine_warmup", "linear_warmup", "constant", "wsd")
PARALLEL = ("ddp", "fsdp")

# Learning rate of the main optimizer when the user gives none.
DEFAULT_LR = {"muon": 0.02, "adamw": 3e-3, "lion": 3e-4, "adafactor": 1e-2}


@dataclass
class AdaptiveMoEModelConfig:
    # ---- model ----
    model_type: str = "moe"
    vocab_size: int | None = None  # None: 8192 for a trained BPE, the tokenizer's size for --tokenizer
    d_model: int | None = None
    n_layers: int | None = None
    n_heads: int | None = None
    n_kv_heads: int | None = None  # None: as many as n_heads (no grouped-query attention)
    d_ff: int | None = None
    max_seq_len: int | None = None
    mlp_type: str = "swiglu"
    qk_norm: bool = False
    tie_embeddings: bool = True
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    dropout: float = 0.0
    init_std: float = 0.02
    # ---- mixture of experts ----
    num_experts: int = 8
    expert_top_k: int = 2
    moe_d_ff: int | None = None  # None: d_ff
    capacity_factor: float = 0.0  # 0: dropless
    load_balancing_weight: float = 0.01
    router_z_loss_weight: float = 0.001
    router_noise: float = 0.0
    shared_expert: bool = False
    # ---- data ----
    dataset: str = "shakespeare"
    dataset_type: str = "packed"
    tokenizer: str | None = None  # None: train a byte-level BPE on the training split
    text_field: str = "text"
    num_documents: int | None = None
    max_tokens: int | None = None
    val_fraction: float = 0.1
    split_seed: int = 0  # which documents are held out; separate from `seed` so runs share a val set
    stride: int | None = None  # text_token windows; None: seq_len // 2
    document_mask: bool = False
    cache_dir: str = "data_cache"
    # ---- optimisation ----
    optimizer: str = "muon"
    lr: float | None = None
    adamw_lr: float = 3e-3  # embeddings, head, norms, router in the Muon hybrid
    weight_decay: float = 0.0
    adamw_betas: tuple[float, float] = (0.9, 0.95)
    muon_momentum: float = 0.95
    muon_momentum_start: float = 0.85
    momentum_warmup_steps: int = 300
    muon_update_scale: str = "shape"  # "shape": max(1, rows/cols)^0.5, "adamw": 0.2*sqrt(max(rows, cols))
    schedule: str = "cosine_warmup"
    warmup_steps: int | None = None
    min_lr_ratio: float = 0.1
    decay_fraction: float = 0.2  # wsd: final fraction of steps spent decaying
    grad_clip: float = 1.0
    # ---- training ----
    batch_size: int | None = None
    grad_accum_steps: int = 1
    max_steps: int | None = None
    eval_every: int | None = None
    eval_batches: int = 20
    checkpoint_every: int | None = None
    keep_checkpoints: int = 2
    max_nonfinite_steps: int = 5
    sample_tokens: int = 48
    seed: int = 1337
    device: str | None = None
    out_dir: str | None = None  # None: runs/<date>-<time>-<model_type>
    use_amp: bool | None = None
    use_fp8: bool | None = None
    compile: bool | None = None
    parallel: str = "ddp"
    # ---- bookkeeping (not user settings) ----
    auto_fields: tuple[str, ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        if self.auto_fields:  # already resolved (loaded from a checkpoint or copied): keep its record
            return
        caps = self.capabilities()
        auto = []
        for name, value in _hardware_defaults(caps, self).items():
            if getattr(self, name) is None:
                setattr(self, name, value)
                auto.append(name)
        self.auto_fields = tuple(auto)

    # ---- derived values ----
    def capabilities(self) -> Capabilities:
        return detect_capabilities(self.device)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def expert_d_ff(self) -> int:
        return self.moe_d_ff or self.d_ff

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.grad_accum_steps * self.max_seq_len

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["adamw_betas"] = list(self.adamw_betas)
        d["auto_fields"] = list(self.auto_fields)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "AdaptiveMoEModelConfig":
        d = dict(d)
        d["adamw_betas"] = tuple(d.get("adamw_betas", (0.9, 0.95)))
        d["auto_fields"] = tuple(d.get("auto_fields", ()))
        return cls(**d)

    def replace(self, **changes) -> "AdaptiveMoEModelConfig":
        return dataclasses.replace(self, **changes)

    # ---- validation ----
    def validate(self) -> "AdaptiveMoEModelConfig":
        def positive(name):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(name, f"must be a positive integer, got {value!r}")

        def choice(name, allowed):
            if getattr(self, name) not in allowed:
                raise ConfigError(name, f"must be one of {', '.join(allowed)}; got {getattr(self, name)!r}")

        def in_range(name, lo, hi, lo_open=False):
            value = getattr(self, name)
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            ok = ok and (value > lo if lo_open else value >= lo) and value <= hi
            if not ok:
                bracket = "(" if lo_open else "["
                raise ConfigError(name, f"must be in {bracket}{lo}, {hi}], got {value!r}")

        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "max_seq_len",
                     "num_experts", "expert_top_k", "batch_size", "grad_accum_steps", "max_steps",
                     "eval_every", "eval_batches", "checkpoint_every", "keep_checkpoints",
                     "max_nonfinite_steps"):
            positive(name)
        if self.moe_d_ff is not None:
            positive("moe_d_ff")
        if self.stride is not None:
            positive("stride")
        for name in ("num_documents", "max_tokens"):
            if getattr(self, name) is not None:
                positive(name)
        choice("model_type", MODEL_TYPES)
        choice("mlp_type", MLP_TYPES)
        choice("dataset_type", DATASET_TYPES)
        choice("optimizer", OPTIMIZERS)
        choice("schedule", SCHEDULES)
        choice("parallel", PARALLEL)
        choice("muon_update_scale", ("shape", "adamw"))
        if self.d_model % self.n_heads:
            raise ConfigError("d_model", f"must be divisible by n_heads ({self.d_model} % {self.n_heads} != 0)")
        if self.head_dim % 2:
            raise ConfigError("d_model", f"d_model / n_heads = {self.head_dim} must be even for rotary embeddings")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError("n_kv_heads", f"must divide n_heads ({self.n_heads}), got {self.n_kv_heads}")
        if self.expert_top_k > self.num_experts:
            raise ConfigError("expert_top_k", f"must be at most num_experts ({self.num_experts}), got {self.expert_top_k}")
        if self.vocab_size < 260:
            raise ConfigError("vocab_size", f"must be at least 260 (256 bytes + special tokens), got {self.vocab_size}")
        in_range("lr", 0.0, 10.0, lo_open=True)
        in_range("adamw_lr", 0.0, 10.0, lo_open=True)
        in_range("weight_decay", 0.0, 10.0)
        in_range("val_fraction", 0.0, 0.5, lo_open=True)
        in_range("dropout", 0.0, 0.9)
        in_range("capacity_factor", 0.0, 64.0)
        in_range("load_balancing_weight", 0.0, 100.0)
        in_range("router_z_loss_weight", 0.0, 100.0)
        in_range("router_noise", 0.0, 10.0)
        in_range("min_lr_ratio", 0.0, 1.0)
        in_range("decay_fraction", 0.0, 1.0)
        in_range("grad_clip", 0.0, 1e6)
        in_range("muon_momentum", 0.0, 1.0)
        in_range("muon_momentum_start", 0.0, 1.0)
        if self.warmup_steps < 0:
            raise ConfigError("warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        if self.momentum_warmup_steps < 0:
            raise ConfigError("momentum_warmup_steps", f"must be >= 0, got {self.momentum_warmup_steps}")
        if self.use_fp8 and not self.capabilities().supports_fp8:
            raise ConfigError("use_fp8", "FP8 was requested but this device has no FP8 support "
                              "(needs CUDA compute capability >= 8.9); drop the request or pass --no-fp8")
        return self


def _hardware_defaults(caps: Capabilities, cfg: AdaptiveMoEModelConfig) -> dict:
    """Defaults for fields left None, sized from the device's kind and memory."""
    if caps.is_cuda:
        big = caps.memory_gb >= 40
        size = dict(d_model=768 if big else 512, n_layers=12 if big else 8, n_heads=12 if big else 8,
                    max_seq_len=1024, batch_size=32 if big else 16, max_steps=5000)
    else:
        # Sized so that `python train.py` trains in under 10 minutes on 2 cores (docs/LOG.md).
        size = dict(d_model=256, n_layers=4, n_heads=4, max_seq_len=256, batch_size=16, max_steps=400)
    d_model = cfg.d_model or size["d_model"]
    max_steps = cfg.max_steps or size["max_steps"]
    lr_default = DEFAULT_LR.get(cfg.optimizer, 3e-3)
    return dict(
        **size,
        n_kv_heads=cfg.n_heads or size["n_heads"],
        d_ff=(8 * d_model // 3 + 63) // 64 * 64 if cfg.model_type == "standard" else 2 * d_model,
        vocab_size=8192,
        lr=lr_default,
        warmup_steps=min(100, max(1, max_steps // 20)),
        eval_every=max(1, min(250, max_steps // 4)),
        checkpoint_every=max(1, min(1000, max_steps // 2)),
        use_amp=caps.autocast_dtype is not None,
        use_fp8=caps.supports_fp8,
        # torch.compile costs ~30-60 s here (docs/LOG.md) and saves 25-35% per step: worth it past ~150 steps
        compile=max_steps >= 150,
    )
