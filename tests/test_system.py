import dataclasses

import pytest
import torch

from blueberry.system import SYSTEM_CONFIG, capabilities_for_device, detect_capabilities, print_system_info

CASES = [
    ((7, 0), "volta", False, False),
    ((7, 5), "turing", False, False),
    ((8, 0), "ampere", True, False),
    ((8, 6), "ampere", True, False),
    ((8, 9), "ada", True, True),
    ((9, 0), "hopper", True, True),
    ((10, 0), "blackwell", True, True),
    ((12, 0), "blackwell", True, True),
]


@pytest.mark.parametrize("cc,arch,bf16,fp8", CASES)
def test_cuda_capabilities_from_compute_capability(cc, arch, bf16, fp8):
    caps = capabilities_for_device("cuda", compute_capability=cc, device_name="mock", memory_gb=24.0,
                                   cpu_flags=set(), cpu_cores=8)
    assert caps.architecture == arch
    assert caps.supports_bf16 is bf16 and caps.supports_tf32 is bf16
    assert caps.supports_fp8 is fp8
    assert caps.autocast_dtype == (torch.bfloat16 if bf16 else torch.float16)


def test_hopper_is_not_called_blackwell():
    assert capabilities_for_device("cuda", compute_capability=(9, 0), cpu_flags=set()).architecture == "hopper"


@pytest.mark.parametrize("flags,bf16,arch", [
    ({"avx2", "amx_bf16", "avx512_bf16"}, True, "cpu-amx"),
    ({"avx2", "avx512_bf16"}, True, "cpu-avx512-bf16"),
    ({"avx2"}, False, "cpu"),
])
def test_cpu_capabilities(flags, bf16, arch):
    caps = capabilities_for_device("cpu", cpu_flags=flags, cpu_cores=2)
    assert caps.supports_bf16 is bf16 and not caps.supports_fp8 and caps.architecture == arch
    assert caps.autocast_dtype == (torch.bfloat16 if bf16 else None)
    assert caps.peak_flops > 0


def test_capabilities_are_immutable():
    with pytest.raises(dataclasses.FrozenInstanceError):
        SYSTEM_CONFIG.supports_fp8 = True


def test_detect_and_print(capsys):
    caps = detect_capabilities("cpu")
    assert caps.device_type == "cpu" and caps.cpu_cores >= 1
    print_system_info(caps)
    assert "FP8 Support: False" in capsys.readouterr().out
