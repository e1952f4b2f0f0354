"""The process-wide `SYSTEM_CONFIG` and a human-readable report of it."""

from __future__ import annotations

import torch

from .capabilities import Capabilities, detect_capabilities

SYSTEM_CONFIG: Capabilities = detect_capabilities()


def set_cpu_threads(caps: Capabilities = SYSTEM_CONFIG) -> int:
    """Use every core this process may run on for intra-op parallelism; returns the count."""
    torch.set_num_threads(max(1, caps.cpu_cores))
    return torch.get_num_threads()


def print_system_info(caps: Capabilities = SYSTEM_CONFIG) -> None:
    print("System configuration:")
    print(f"   Device: {caps.device_name} ({caps.device_type}, x{caps.device_count})")
    print(f"   Architecture: {caps.architecture}")
    if caps.compute_capability:
        print(f"   Compute capability: {caps.compute_capability[0]}.{caps.compute_capability[1]}")
    print(f"   Memory: {caps.memory_gb:.1f} GB")
    print(f"   CPU cores: {caps.cpu_cores} (AMX-BF16: {caps.cpu_amx_bf16}, AVX512-BF16: {caps.cpu_avx512_bf16})")
    print(f"   BF16 Support: {caps.supports_bf16}")
    print(f"   FP8 Support: {caps.supports_fp8}")
    print(f"   Mixed precision: {caps.autocast_dtype or 'fp32'}")
