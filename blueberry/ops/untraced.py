"""What torch.compile must run eagerly, never trace: the expert matmuls' slice loop, whose split sizes are read
to the host (traced, every layer and every new count would compile a graph of its own).

ops/grouped_mm imports this module only while compiling: `torch.compiler.disable` imports the compiler, which a
process that never compiles (generate, eval, export) should not pay for at start-up."""

from __future__ import annotations

import torch

from .slice_loop import slice_loop

untraced_slice_loop = torch.compiler.disable(slice_loop)
