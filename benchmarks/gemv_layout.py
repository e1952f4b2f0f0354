"""Few-row matmuls by weight layout and kernel: `F.linear` on (out, in) weights as trained vs the same matrices
stored by input rows (`models.layers.stored_transposed`), the choice behind `Capabilities.decode_weights_transposed`,
and on that layout the product the engine takes (`ops.matmul.inference_linear`: oneDNN from two float32 rows up).

    python benchmarks/gemv_layout.py [--d-model 256] [--d-ff 704] [--layers 4] [--vocab 4096] [--rows 1,2,8,16,32]
                                     [--dtypes fp32,bf16]

The weights are a decoder's (fused q/k/v, attention output, fused gate/up, down per layer, and the head),
multiplied one after another as a decode step does, so each is read from memory rather than from the cache
of the previous call; ms per step, the best of 5 runs of 50 steps, fp32 and bf16.
"""

from __future__ import annotations

import argparse
import time

from common import table


def step_ms(weights, inputs, product=None) -> float:
    import torch.nn.functional as F

    product = product or F.linear
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(50):
            for w in weights:
                product(inputs[w.shape[1]], w)
        best = min(best, (time.perf_counter() - start) / 50)
    return best * 1e3


def main() -> None:
    import torch

    from blueberry.models.layers import stored_transposed
    from blueberry.ops.matmul import inference_linear

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--d-ff", type=int, default=704)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--rows", default="1,2,8,16,32")
    p.add_argument("--dtypes", default="fp32,bf16", help="bf16 takes minutes on a CPU without native bf16 math")
    args = p.parse_args()
    d, f = args.d_model, args.d_ff
    shapes = [(3 * d, d), (d, d), (2 * f, d), (d, f)] * args.layers + [(args.vocab, d)]
    rows = []
    for dtype in ({"fp32": torch.float32, "bf16": torch.bfloat16}[name] for name in args.dtypes.split(",")):
        as_trained = [torch.randn(shape).to(dtype) for shape in shapes]
        by_input = [stored_transposed(w) for w in as_trained]
        for m in map(int, args.rows.split(",")):
            inputs = {k: torch.randn(m, k).to(dtype) for k in (d, f)}
            a, b = step_ms(as_trained, inputs), step_ms(by_input, inputs)
            c = step_ms(by_input, inputs, inference_linear)
            rows.append([str(dtype).split(".")[1], m, f"{a:.3f}", f"{b:.3f}", f"{a / b:.2f}x", f"{c:.3f}", f"{a / c:.2f}x"])
    print(table(["dtype", "rows", "(out, in) ms", "by input rows ms", "speed-up", "inference_linear ms", "speed-up"],
                rows))


if __name__ == "__main__":
    main()
