"""Hardware detection: what the machine can do, as an immutable capabilities object.

Code elsewhere asks `SYSTEM_CONFIG.supports_fp8`, never for a GPU's name.
"""

from .capabilities import Capabilities, detect_capabilities, capabilities_for_device, architecture_name
from .info import SYSTEM_CONFIG, print_system_info, set_cpu_threads

__all__ = [
    "Capabilities",
    "detect_capabilities",
    "capabilities_for_device",
    "architecture_name",
    "SYSTEM_CONFIG",
    "print_system_info",
    "set_cpu_threads",
]
