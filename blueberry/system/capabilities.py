"""Turn what torch and the CPU report into a frozen `Capabilities` record.

FP8 needs CUDA compute capability >= 8.9 (Ada, Hopper, Blackwell), bf16 >= 8.0, TF32 >= 8.0.
On CPUs, bf16 autocast pays only with AMX-BF16 or AVX512-BF16 instructions.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch

# Compute capability (major, minor) -> architecture name. Names are for display only.
_ARCHITECTURES = {
    (7, 0): "volta",
    (7, 5): "turing",
    (8, 0): "ampere",
    (8, 6): "ampere",
    (8, 7): "ampere",
    (8, 9): "ada",
    (9, 0): "hopper",
}


def architecture_name(major: int, minor: int) -> str:
    if major in (10, 11, 12):
        return "blackwell"
    return _ARCHITECTURES.get((major, minor), f"sm_{major}{minor}")


@dataclass(frozen=True)
class Capabilities:
    device_type: str  # "cuda" or "cpu"
    device_name: str
    architecture: str
    compute_capability: tuple[int, int] | None
    device_count: int
    memory_gb: float  # accelerator memory, or system RAM on CPU
    cpu_cores: int
    cpu_amx_bf16: bool
    cpu_avx512_bf16: bool
    supports_bf16: bool
    supports_fp16: bool
    supports_fp8: bool
    supports_tf32: bool
    supports_grouped_mm: bool  # one fused kernel for many expert matmuls (F.grouped_mm)

    @property
    def is_cuda(self) -> bool:
        return self.device_type == "cuda"

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """The mixed-precision dtype that pays on this device, or None for plain fp32."""
        if self.supports_bf16:
            return torch.bfloat16
        if self.supports_fp16:
            return torch.float16
        return None

    @property
    def supports_fp8_grouped_mm(self) -> bool:
        """FP8 grouped expert matmuls (torchao's rowwise-scaled `_scaled_grouped_mm`): Hopper and later."""
        return (self.is_cuda and self.supports_fp8 and self.supports_grouped_mm
                and self.compute_capability >= (9, 0) and hasattr(torch, "_scaled_grouped_mm"))

    @property
    def peak_flops(self) -> float:
        """Dense peak FLOP/s of one device (one GPU, or the whole CPU) used for MFU (see `_peak_flops`)."""
        return _peak_flops(self)

    def decode_weights_transposed(self, dtype: torch.dtype) -> bool:
        """Store inference weights of `dtype` by input rows (`models.layers.stored_transposed`): on CPUs
        MKL's float32 kernels for a few rows run far faster on the contiguous (in, out) matrix, while
        oneDNN's bf16 ones run far slower (`benchmarks/gemv_layout.py`); GPU libraries take either alike."""
        return not self.is_cuda and dtype == torch.float32

    def serving_threads(self) -> int | None:
        """torch's intra-op threads for a server's engine: on a CPU one core fewer than it has (at least
        one), the other left to the HTTP event loop and its streams: intra-op threads that share a core
        with them wait at every one of a decode step's many small kernels (`benchmarks/server_load.py
        --serve-args="--threads N"` compares). GPUs: None, torch's default."""
        return None if self.is_cuda else max(1, self.cpu_cores - 1)

    def decode_compile_options(self, experts: bool = False) -> dict:
        """Inductor options for the generation engine's fixed-shape decode step (a handful of small matmuls
        and the kernels between them, run once per token). CPU: the weights folded in as constants and
        laid out for the GEMM (`freezing`), the kernels called from C++ rather than one Python call each
        (`cpp_wrapper`), and inductor's C++ GEMM templates measured against the library's at compile
        time (`max_autotune` with the CPP backend): small matrix-vector products are where MKL's generic
        path loses most (`benchmarks/decode_options.py`). Not the templates for a model with `experts`:
        with freezing they gave wrong tokens on the MoE dispatch path (torch 2.13; tests/test_inference.py
        `test_compiled_decode_equals_eager_and_transformers[moe-6]`). GPUs: inductor's defaults."""
        if self.is_cuda:
            return {}
        options = {"freezing": True, "cpp_wrapper": True}
        if not experts:
            options.update(max_autotune=True, max_autotune_gemm_backends="CPP,ATEN")
        return options

    def expert_group_alignment(self, dtype: torch.dtype) -> int:
        """Rows to pad each MoE expert's group to. CPU bf16/fp16 matmuls run on oneDNN kernels compiled
        per shape, and routing gives every expert a new row count each step: multiples of 64 keep the
        shapes in a small cached set (`benchmarks/matmul_throughput.py`). CPU fp32 kernels need no
        compiling, so no padding (1). GPUs: 16, tile-friendly."""
        if not self.is_cuda:
            return 64 if dtype in (torch.bfloat16, torch.float16) else 1
        return 16

    def job_peak_flops(self, world_size: int = 1, local_world_size: int = 1) -> float:
        """Peak FLOP/s of a job of `world_size` processes, `local_world_size` of them per machine: one GPU
        per process, or a machine's CPU cores shared by the processes on it. Never the count of visible
        GPUs: a single process on an 8-GPU node uses one of them."""
        if self.is_cuda:
            return self.peak_flops * world_size
        return self.peak_flops * world_size / max(1, local_world_size)


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _ram_gb() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    except (ValueError, OSError, AttributeError):
        return 0.0


def capabilities_for_device(
    device_type: str,
    *,
    compute_capability: tuple[int, int] | None = None,
    device_name: str = "cpu",
    device_count: int = 1,
    memory_gb: float = 0.0,
    cpu_flags: set[str] | None = None,
    cpu_cores: int | None = None,
) -> Capabilities:
    """Pure function from raw facts to capabilities; `detect_capabilities` feeds it real facts."""
    flags = _cpu_flags() if cpu_flags is None else cpu_flags
    amx = "amx_bf16" in flags
    avx512_bf16 = "avx512_bf16" in flags
    cores = _cpu_cores() if cpu_cores is None else cpu_cores
    if device_type == "cuda":
        assert compute_capability is not None
        major, minor = compute_capability
        cc = major * 10 + minor
        return Capabilities(
            device_type="cuda",
            device_name=device_name,
            architecture=architecture_name(major, minor),
            compute_capability=(major, minor),
            device_count=device_count,
            memory_gb=memory_gb,
            cpu_cores=cores,
            cpu_amx_bf16=amx,
            cpu_avx512_bf16=avx512_bf16,
            supports_bf16=cc >= 80,
            supports_fp16=cc >= 70,
            supports_fp8=cc >= 89,
            supports_tf32=cc >= 80,
            supports_grouped_mm=cc >= 90 and _has_grouped_mm(),
        )
    return Capabilities(
        device_type="cpu",
        device_name=device_name,
        architecture="cpu-amx" if amx else ("cpu-avx512-bf16" if avx512_bf16 else "cpu"),
        compute_capability=None,
        device_count=1,
        memory_gb=memory_gb or _ram_gb(),
        cpu_cores=cores,
        cpu_amx_bf16=amx,
        cpu_avx512_bf16=avx512_bf16,
        supports_bf16=amx or avx512_bf16,
        supports_fp16=False,
        supports_fp8=False,
        supports_tf32=False,
        supports_grouped_mm=_has_grouped_mm(),
    )


def _has_grouped_mm() -> bool:
    return hasattr(torch.nn.functional, "grouped_mm")


@functools.lru_cache(maxsize=None)
def detect_capabilities(device: str | None = None) -> Capabilities:
    """Detect the capabilities of `device` ("cuda", "cuda:1", "cpu"), or of the best device present;
    detected once per device and process."""
    want_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if want_cuda and torch.cuda.is_available():
        index = torch.device(device).index if device and ":" in device else 0
        props = torch.cuda.get_device_properties(index or 0)
        return capabilities_for_device(
            "cuda",
            compute_capability=(props.major, props.minor),
            device_name=props.name,
            device_count=torch.cuda.device_count(),
            memory_gb=props.total_memory / 1e9,
        )
    return capabilities_for_device("cpu", device_name=_cpu_model_name())


def _cpu_model_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "cpu"


# Dense bf16 tensor-core peaks (FLOP/s) per architecture; per-core estimates on CPU.
_GPU_BF16_PEAK = {"ampere": 312e12, "ada": 165e12, "hopper": 989e12, "blackwell": 2250e12}
# AMX-BF16 per core: 1024 bf16 FLOP/cycle at ~2 GHz; AVX512-BF16: 64 FLOP/cycle; AVX2 fp32 FMA: 32 FLOP/cycle.
_CPU_FLOPS_PER_CORE = {"cpu-amx": 1024 * 2.0e9, "cpu-avx512-bf16": 64 * 2.0e9, "cpu": 32 * 2.0e9}


def _peak_flops(caps: Capabilities) -> float:
    if caps.is_cuda:
        return _GPU_BF16_PEAK.get(caps.architecture, 100e12)
    return _CPU_FLOPS_PER_CORE[caps.architecture] * caps.cpu_cores
