"""Numerical kernels chosen from the hardware's capabilities.

`matmul(x, w)` and `linear(x, w, b, use_fp8)` run real FP8 (e4m3 forward, e5m2 gradients, dynamic
per-tensor scaling through `torch._scaled_mm`) when asked and the shapes qualify, else the ordinary
(autocast-aware) matmul. `inference_linear` is the decode product (the weights' inference layout).
"""

from .fp8 import fp8_linear, fp8_shapes_qualify, to_float8
from .matmul import inference_linear, linear, matmul

__all__ = ["matmul", "linear", "inference_linear", "fp8_linear", "fp8_shapes_qualify", "to_float8"]
