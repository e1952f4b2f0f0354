"""Whether FP8 pays for this run (`--fp8 auto`, the default where the GPU has FP8): decided by measurement,
not by capability alone.

FP8 saves matmul time but adds casts; at small widths, or where only a minority of the FLOPs can run in
FP8, the casts win. So before training, one block of each kind in the model is timed forward and backward
at the run's own micro-batch shape — as is (bf16) and with FP8 applied as training would apply it
(`training/float8.py`), compiled when the run compiles — and FP8 is turned on only where its step is
faster. The verdict is cached per device, software versions and shapes (`fp8_choices.json` in the data
cache directory), so a machine measures a shape once. A value the user gave (`--fp8 on|off`) is never
measured or changed.
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import time
from collections import Counter
from pathlib import Path
from typing import Callable

import torch

from ..atomic import atomic_write_text
from ..extras import available
from ..logs import get_logger
from .float8 import apply_float8

log = get_logger(__name__).info

CACHE_FILE = "fp8_choices.json"


def time_variants(variants: dict[str, Callable[[], object]], repeats: int = 5, warmup: int = 2,
                  sync: Callable[[], None] = lambda: None) -> dict[str, float]:
    """Median seconds of each callable, alternating between them so that drift hits both alike."""
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    sync()
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            sync()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(s) for name, s in samples.items()}


def decision_key(config, device: torch.device) -> str:
    """What the verdict depends on: the device, the software and the shapes a step multiplies."""
    import torchao

    caps = config.capabilities()
    m = config.model
    shapes = (f"b{config.training.batch_size}xT{m.max_seq_len}xd{m.d_model}xff{m.d_ff}xh{m.n_heads}/{m.n_kv_heads}"
              f"xE{m.num_experts}k{m.expert_top_k}xeff{m.expert_d_ff}x{','.join(sorted(_block_kinds(m)))}")
    return (f"{caps.device_name}|torch {torch.__version__}|torchao {torchao.__version__}|"
            f"compile {bool(config.training.compile)}|{shapes}")


def choose_fp8(model: torch.nn.Module, config, cache_dir: str | os.PathLike) -> bool:
    """FP8 on or off for `model` (built, on its device, before any wrapping), with the reason said."""
    caps = config.capabilities()
    if not caps.supports_fp8:
        return False
    if not available("torchao"):
        log("FP8 off: torchao is not installed (pip install 'blueberry[fp8]')")
        return False
    device = next(model.parameters()).device
    path = Path(cache_dir) / CACHE_FILE
    key = decision_key(config, device)
    cache = _read(path)
    if key in cache:
        verdict = cache[key]
        log(f"FP8 {'on' if verdict['fp8'] else 'off'}: measured before at these shapes on this device "
            f"(step of one of each block kind: bf16 {verdict['bf16_ms']:.2f} ms, fp8 {verdict['fp8_ms']:.2f} ms; "
            f"{path}); --fp8 on/off decides instead")
        return verdict["fp8"]
    times = measure_blocks(model, config, device)
    verdict = {"fp8": times["fp8"] < times["bf16"], "bf16_ms": times["bf16"] * 1e3, "fp8_ms": times["fp8"] * 1e3}
    cache[key] = verdict
    _write(path, cache)
    log(f"FP8 {'on' if verdict['fp8'] else 'off'}: measured at the run's shapes, step of one of each block kind "
        f"bf16 {verdict['bf16_ms']:.2f} ms vs fp8 {verdict['fp8_ms']:.2f} ms (cached in {path}); "
        "--fp8 on/off decides instead")
    return verdict["fp8"]


def measure_blocks(model: torch.nn.Module, config, device: torch.device) -> dict[str, float]:
    """Seconds of a forward and backward of one block of each kind (weighted by how many the model has)
    at the run's micro-batch shape, in bf16 and in FP8."""
    specs = [str(spec) for spec in config.model.layer_pattern]
    counts = Counter(specs)
    firsts = {}
    for spec, block in zip(specs, model.blocks):
        firsts.setdefault(spec, block)
    x = torch.randn(config.training.batch_size, config.model.max_seq_len, config.model.d_model, device=device)
    variants = {}
    for name in ("bf16", "fp8"):
        steps = [(_block_step(copy.deepcopy(b), name == "fp8", bool(config.training.compile), x), counts[spec])
                 for spec, b in firsts.items()]
        variants[name] = lambda steps=steps: [fn() for fn, n in steps for _ in range(n)]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    return time_variants(variants, sync=sync)


def _block_step(block: torch.nn.Module, fp8: bool, compiled: bool, x: torch.Tensor) -> Callable[[], None]:
    block = apply_float8(block.train(), fp8)
    forward = torch.compile(block) if compiled else block

    def step():
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            out, aux = forward(x)
            loss = out.float().pow(2).mean() + (aux.loss if aux is not None else 0.0)
        loss.backward()
        for p in block.parameters():
            p.grad = None
    return step


def _block_kinds(model_config) -> set[str]:
    return {str(spec) for spec in model_config.layer_pattern}


def _read(path: Path) -> dict:
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return cache if isinstance(cache, dict) else {}  # not ours, or damaged: measured again


def _write(path: Path, cache: dict) -> None:
    """Atomically: a killed run leaves the old cache or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(cache, indent=1, sort_keys=True))
