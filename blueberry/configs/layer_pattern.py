"""The layer pattern: which mixer and which feed-forward each block of the stack has.

Notation (`--layers`): blocks separated by commas, each `MIXER:FFN` or `MIXER` (no feed-forward),
`*N` repeats a block, and `mod(MIXER:FFN)` puts a block behind a Mixture-of-Depths router. The pattern
is tiled to n_layers, so its length must divide n_layers. Examples:

    attn:moe                      every block attention + MoE (what --model-type moe means)
    attn:mlp                      dense transformer (--model-type standard)
    mamba                         pure Mamba-2 stack, no feed-forwards
    mamba:mlp*3,attn:mlp          one attention block in four
    attn:mlp,mod(attn:mlp)        Mixture-of-Depths every other block (as the MoD paper)
    retention:mlp                 RetNet
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MIXERS = ("attn", "mamba", "retention")
FEED_FORWARDS = ("mlp", "moe", "none")
STATEFUL_MIXERS = ("mamba", "retention")  # a fixed-size recurrent state instead of a KV cache
DEFAULT_PATTERNS = {"moe": "attn:moe", "standard": "attn:mlp"}

_BLOCK = re.compile(r"^(?P<mod>mod\()?(?P<mixer>[a-z0-9_]+)(?::(?P<ffn>[a-z0-9_]+))?(?(mod)\))(?:\*(?P<n>\d+))?$")


@dataclass(frozen=True)
class LayerSpec:
    mixer: str
    ffn: str = "none"
    mod: bool = False  # routed by Mixture-of-Depths

    def __str__(self) -> str:
        text = self.mixer if self.ffn == "none" else f"{self.mixer}:{self.ffn}"
        return f"mod({text})" if self.mod else text


def parse_layers(pattern: str, n_layers: int) -> list[LayerSpec]:
    """The LayerSpec of each of n_layers blocks; ValueError (one line, saying what to write) if invalid."""
    blocks: list[LayerSpec] = []
    for part in pattern.replace(" ", "").split(","):
        m = _BLOCK.match(part)
        if not m:
            raise ValueError(f"cannot read {part!r}: write MIXER:FFN (e.g. attn:mlp, mamba:moe, mamba), "
                             "optionally *N, or mod(attn:FFN)")
        spec = LayerSpec(m["mixer"], m["ffn"] or "none", bool(m["mod"]))
        if spec.mixer not in MIXERS:
            raise ValueError(f"unknown mixer {spec.mixer!r} in {part!r}; choose from {', '.join(MIXERS)}")
        if spec.ffn not in FEED_FORWARDS:
            raise ValueError(f"unknown feed-forward {spec.ffn!r} in {part!r}; choose from {', '.join(FEED_FORWARDS)}")
        if spec.mod and spec.mixer != "attn":
            raise ValueError(f"{part!r}: Mixture-of-Depths routes attention blocks only (a recurrent mixer "
                             "cannot skip tokens without corrupting its state); write mod(attn:FFN)")
        count = int(m["n"] or 1)
        if count < 1:
            raise ValueError(f"{part!r}: the repeat count must be at least 1")
        blocks += [spec] * count
    if n_layers % len(blocks):
        raise ValueError(f"the pattern has {len(blocks)} blocks, which does not divide n_layers ({n_layers}); "
                         f"give a pattern of {n_layers} blocks or of a divisor of it")
    return blocks * (n_layers // len(blocks))


def describe(specs: list[LayerSpec]) -> str:
    """A short name for a stack: dense, moe, mamba, retention, mod or hybrid (for logs and run names)."""
    mixers = {s.mixer for s in specs}
    if any(s.mod for s in specs):
        return "mod"
    if mixers == {"attn"}:
        ffns = {s.ffn for s in specs}
        return "moe" if ffns == {"moe"} else "standard" if ffns == {"mlp"} else "attn-mixed"
    return mixers.pop() if len(mixers) == 1 else "hybrid"
