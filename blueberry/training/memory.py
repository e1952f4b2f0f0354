"""What a run needs in memory, estimated before it starts, and a clear refusal when it cannot fit.

  weights      parameters x 4 bytes (fp32 master weights; autocast computes in bf16 from them)
  gradients    the same
  optimizer    AdamW / Lion: 2 / 1 fp32 states per parameter; Muon hybrid: 1 momentum per hidden-matrix
               parameter, 2 states for the AdamW rest; Adafactor: ~0 (factored)
  activations  kept for backward, per micro-batch and token, per block: 16 x d_model + 3 x active FFN width
               values (attention through SDPA keeps no seq x seq scores; a Mamba-2 mixer 10 x expand x
               d_model); with selective checkpointing only the matmul outputs, ~6 x d_model + 2 x FFN width
               + d_model (Mamba-2: 3 x expand x d_model); with full checkpointing each block's input (d_model)
               plus one block's whole activations while it is recomputed; plus one chunk of logits, at
               2 bytes under bf16/fp16 autocast or 4 in fp32
Under FSDP2 the first three are divided by the number of processes. Weights, gradients and optimizer
states are counted from the model (the optimizer part is checked against real AdamW and Muon states in
tests/test_sft.py); the activation term is a rule of thumb, not a measurement. The check refuses a run
whose estimate exceeds the device's memory (GPU: its total; CPU: what the system reports available).
"""

from __future__ import annotations

from ..configs.fields import ACTIVATION_CHECKPOINTING
from ..errors import UsageError
from ..logs import get_logger

log = get_logger(__name__).info

GIB = 2**30


def block_values_per_token(config, spec, checkpointing: str) -> int:
    """Values one block keeps per token for its backward pass."""
    d = config.model.d_model
    ffn = {"moe": config.model.expert_top_k * config.expert_d_ff, "mlp": config.model.d_ff, "none": 0}[spec.ffn]
    mamba = spec.mixer == "mamba"
    if checkpointing == "selective":
        mixer = 3 * config.model.ssm_expand * d if mamba else 6 * d
        return d + mixer + 2 * ffn + (d if ffn else 0)
    return (10 * config.model.ssm_expand * d if mamba else 16 * d) + 3 * ffn


def activation_values_per_token(config, checkpointing: str | None = None) -> int:
    """Values kept per token for the backward pass, the whole model (embedding and final norm included)."""
    checkpointing = checkpointing or config.training.activation_checkpointing
    specs = config.model.layer_pattern
    if checkpointing == "full":
        return 2 * config.model.d_model + len(specs) * config.model.d_model + max(
            block_values_per_token(config, s, "none") for s in specs)
    return 2 * config.model.d_model + sum(block_values_per_token(config, s, checkpointing) for s in specs)


def estimate(model, config, world_size: int = 1, checkpointing: str | None = None) -> dict:
    params = sum(p.numel() for p in model.parameters())
    matrices = sum(p.numel() for n, p in model.named_parameters()
                   if p.dim() >= 2 and not n.startswith(("embed", "lm_head")) and "router" not in n)
    states = {"adamw": 2 * params, "lion": params, "adafactor": 0,
              "muon": matrices + 2 * (params - matrices)}.get(config.optim.optimizer, 2 * params)
    shard = world_size if config.training.parallel == "fsdp" else 1
    tokens = config.training.batch_size * config.model.max_seq_len
    per_value = 2 if config.training.use_amp else 4
    activations = tokens * activation_values_per_token(config, checkpointing) * per_value
    activations += min(tokens, 1 << 14) * config.model.vocab_size * 4  # one chunk of fp32 logits
    out = {"parameters": params, "weights": params * 4 / shard, "gradients": params * 4 / shard,
           "optimizer": states * 4 / shard, "activations": activations}
    out["total"] = out["weights"] + out["gradients"] + out["optimizer"] + out["activations"]
    out["checkpointing"] = checkpointing or config.training.activation_checkpointing
    return out


def available_bytes(device) -> float:
    import torch

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


def choose_checkpointing(model, config, device, world_size: int = 1, available: float | None = None) -> str:
    """The least activation checkpointing with which the run's estimate fits the device (or `available`
    bytes, for a device described rather than present: `--dry-run` of a GPU preset)."""
    available = available_bytes(device) if available is None else available
    for mode in ACTIVATION_CHECKPOINTING:
        if estimate(model, config, world_size, mode)["total"] <= available:
            return mode
    return ACTIVATION_CHECKPOINTING[-1]  # check_fits then says what to lower


def check_fits(model, config, device, world_size: int = 1) -> dict:
    e = estimate(model, config, world_size)
    available = available_bytes(device)
    log(describe(e, available))
    if e["total"] > available:
        raise UsageError(f"this run needs about {e['total'] / GIB:.1f} GiB but {device.type} has {available / GIB:.1f} "
                         f"GiB: lower --batch-size (activations {e['activations'] / GIB:.1f} GiB) or --seq-len, use "
                         "--activation-checkpointing selective/full, --grad-accum, a smaller model, --parallel fsdp over more processes, or --optimizer adafactor")
    return e
