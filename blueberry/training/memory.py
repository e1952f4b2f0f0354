"""What a run needs in memory, estimated before it starts, and a clear refusal when it cannot fit.

  weights      parameters x 4 bytes (fp32 master weights; autocast computes in bf16 from them)
  gradients    the same
  optimizer    AdamW / Lion: 2 / 1 fp32 states per parameter; Muon hybrid: 1 momentum per hidden-matrix
               parameter, 2 states for the AdamW rest; Adafactor: ~0 (factored)
  activations  the peak of a step's tensors above those, per micro-batch token: what every block keeps for
               its backward pass, plus the larger of two moments — the loss's chunk of logits (while the
               embedding and final norm are also held) or the block being differentiated last (with
               checkpointing: the one being recomputed); on a CPU under bf16 the attention's scores (of
               ops/attention.py's matmul form) add batch x heads x seq^2 values
Under FSDP2 the first three are divided by the number of processes. Weights, gradients and optimizer
states are counted from the model (the optimizer part is checked against real AdamW and Muon states in
tests/test_sft.py). The activation term is the block's structural count (`block_values`: 16 x d_model + 3 x
active FFN width for attention, 10 x expand x d_model for a Mamba-2 mixer) times coefficients measured per
block kind, checkpointing mode and precision by `python benchmarks/memory_estimate.py --fit` on CPU (which
prints `CALIBRATION` below); tests/test_memory_estimate.py holds the estimate to the measured peak at other
shapes. The check refuses a run whose estimate exceeds the device's memory (GPU: its total; CPU: what the
system reports available).
"""

from __future__ import annotations

import torch

from ..configs.fields import ACTIVATION_CHECKPOINTING
from ..errors import UsageError
from ..logs import get_logger
from ..ops.attention import matmul_form_applies
from ..ops.cross_entropy import chunk_rows

log = get_logger(__name__).info

GIB = 2**30

# (mixer, ffn, precision) -> {checkpointing: (kept, transient)}, each a multiple of the block's structural count
# in fp32 values per token (`block_values`); refitted by `python benchmarks/memory_estimate.py --fit`.
CALIBRATION = {
    ("attn", "mlp", "fp32"): {"none": (1.084, 0.0), "selective": (0.522, 1.198), "full": (0.04, 1.639)},
    ("attn", "moe", "fp32"): {"none": (1.334, 0.0), "selective": (0.575, 1.257), "full": (0.036, 1.796)},
    ("mamba", "mlp", "fp32"): {"none": (2.251, 0.0), "selective": (0.76, 3.285), "full": (0.035, 3.976)},
    ("retention", "mlp", "fp32"): {"none": (1.262, 0.0), "selective": (0.72, 1.543), "full": (0.04, 2.183)},
    ("attn", "mlp", "bf16"): {"none": (0.8, 0.0), "selective": (0.227, 1.269), "full": (0.04, 1.275)},
    ("attn", "moe", "bf16"): {"none": (0.983, 0.0), "selective": (0.28, 1.281), "full": (0.036, 1.381)},
    ("mamba", "mlp", "bf16"): {"none": (1.904, 0.0), "selective": (0.535, 2.985), "full": (0.035, 3.468)},
    ("retention", "mlp", "bf16"): {"none": (0.888, 0.0), "selective": (0.38, 1.242), "full": (0.04, 1.562)},
}
# per token, outside the blocks: values x d_model (embedding, final norm) and copies of the loss chunk's logits
HIDDEN = {"fp32": 7.07, "bf16": 4.37}
LOGIT_COPIES = {"fp32": 2.25, "bf16": 2.68}
# bytes per attention score (CPU, bf16, matmul form): kept by every attention block (full: by the recomputed one)
SCORE_BYTES = {"none": 5.4, "selective": 3.3, "full": 7.4}


def block_values(config, spec) -> int:
    """The block's structural count: values it would keep per token without checkpointing, by its shapes."""
    d = config.model.d_model
    ffn = {"moe": config.model.expert_top_k * config.model.expert_d_ff, "mlp": config.model.d_ff, "none": 0}[spec.ffn]
    return (10 * config.model.ssm_expand * d if spec.mixer == "mamba" else 16 * d) + 3 * ffn


def calibration(spec, checkpointing: str, precision: str) -> tuple[float, float]:
    """The measured coefficients of the nearest measured kind (a mixer with an MLP, else attention's)."""
    for mixer, ffn in ((spec.mixer, spec.ffn), (spec.mixer, "mlp"), ("attn", "mlp")):
        if (mixer, ffn, precision) in CALIBRATION:
            return CALIBRATION[mixer, ffn, precision][checkpointing]
    raise KeyError(f"no calibration for {precision}")


def uses_score_matrices(config, device_type: str) -> bool:
    """Whether the run's attention takes ops/attention.py's matmul form, which holds its scores (document
    masks go to SDPA)."""
    dtype = torch.bfloat16 if config.training.use_amp else torch.float32
    return not config.data.document_mask and matmul_form_applies(device_type, dtype, config.model.max_seq_len,
                                                                 config.model.dropout)


def activation_bytes(config, checkpointing: str | None = None, device_type: str = "cuda") -> float:
    """The peak bytes of one micro-batch's activations (see the module docstring)."""
    mode = checkpointing or config.training.activation_checkpointing
    precision = "bf16" if config.training.use_amp else "fp32"
    m = config.model
    tokens = config.training.batch_size * m.max_seq_len
    coefficients = [(calibration(s, mode, precision), block_values(config, s)) for s in m.layer_pattern]
    kept = sum(c[0] * values for c, values in coefficients)
    transient = max(c[1] * values for c, values in coefficients)
    rows = min(tokens, chunk_rows(m.vocab_size, device_type))
    loss_moment = HIDDEN[precision] * m.d_model + LOGIT_COPIES[precision] * m.vocab_size * rows / tokens
    total = 4.0 * tokens * (kept + max(loss_moment, transient))
    if uses_score_matrices(config, device_type):
        attention = sum(s.mixer == "attn" for s in m.layer_pattern)
        holders = min(attention, 1) if mode == "full" else attention
        total += SCORE_BYTES[mode] * holders * config.training.batch_size * m.n_heads * m.max_seq_len ** 2
    return total


def held_per_device(model, config, world_size: int = 1) -> tuple[float, float]:
    """(parameters, of them Muon's matrices) one device holds: FSDP2 divides by the world size, expert
    parallelism the experts by its degree (they are outside FSDP2's shards)."""
    from .expert_parallel import expert_degree, expert_weights

    degree = expert_degree(config, world_size)
    shard = world_size if config.training.parallel == "fsdp" else 1
    experts = {id(p) for p in expert_weights(model)} if degree > 1 else set()
    held = matrices = 0.0
    for name, p in model.named_parameters():
        share = p.numel() / (degree if id(p) in experts else shard)
        held += share
        if p.dim() >= 2 and not name.startswith(("embed", "lm_head")) and "router" not in name:
            matrices += share
    return held, matrices


def estimate(model, config, world_size: int = 1, checkpointing: str | None = None, device_type: str = "cuda") -> dict:
    held, matrices = held_per_device(model, config, world_size)
    states = {"adamw": 2 * held, "lion": held, "adafactor": 0,
              "muon": matrices + 2 * (held - matrices)}.get(config.optim.optimizer, 2 * held)
    out = {"parameters": sum(p.numel() for p in model.parameters()), "weights": held * 4, "gradients": held * 4,
           "optimizer": states * 4, "activations": activation_bytes(config, checkpointing, device_type)}
    out["total"] = out["weights"] + out["gradients"] + out["optimizer"] + out["activations"]
    out["checkpointing"] = checkpointing or config.training.activation_checkpointing
    return out


def available_bytes(device) -> float:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return float("inf")


def describe(e: dict, available: float) -> str:
    return (f"Memory estimate: weights {e['weights'] / GIB:.2f} GiB, gradients {e['gradients'] / GIB:.2f}, optimizer "
            f"{e['optimizer'] / GIB:.2f}, activations {e['activations'] / GIB:.2f} (checkpointing {e['checkpointing']}) "
            f"= {e['total'] / GIB:.2f} GiB"
            + (f" of {available / GIB:.1f} GiB available" if available != float("inf") else ""))


def choose_checkpointing(model, config, device, world_size: int = 1, available: float | None = None,
                         device_type: str | None = None) -> str:
    """The least activation checkpointing with which the run's estimate fits the device (or `available`
    bytes of a `device_type`, for a device described rather than present: `--dry-run` of a GPU preset)."""
    available = available_bytes(device) if available is None else available
    device_type = device_type or device.type
    for mode in ACTIVATION_CHECKPOINTING:
        if estimate(model, config, world_size, mode, device_type)["total"] <= available:
            return mode
    return ACTIVATION_CHECKPOINTING[-1]  # check_fits then says what to lower


def check_fits(model, config, device, world_size: int = 1) -> dict:
    e = estimate(model, config, world_size, device_type=device.type)
    available = available_bytes(device)
    log(describe(e, available))
    if e["total"] > available:
        raise UsageError(f"this run needs about {e['total'] / GIB:.1f} GiB but {device.type} has {available / GIB:.1f} "
                         f"GiB: lower --batch-size (activations {e['activations'] / GIB:.1f} GiB) or --seq-len, use "
                         "--activation-checkpointing selective/full, --grad-accum, a smaller model, --parallel fsdp over more processes, or --optimizer adafactor")
    return e
