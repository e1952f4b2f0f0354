"""The data position a checkpoint saves: where the loaders' global order stands, whatever the world size.

ShardedLoader reads one global order per epoch, each step taking the next world * batch items
(rank r those at offsets r, r + world, ...). Its state is the number of items of the epoch's order taken
by all ranks together (`consumed`), so N ranks stopped and M ranks resumed continue the same order; a state
saved before that (`position`: steps of its own world size) continues on that world size only. A mixture's
position is per rank (each rank draws its own sources) and cannot be re-partitioned.
"""

from __future__ import annotations

from ..errors import CheckpointError


def consumed_of(state: dict, loader) -> int:
    """The global position of a saved loader state; a state older than that (steps of its own world size)
    continues on the world size that wrote it only."""
    if "consumed" in state:
        return int(state["consumed"])
    written = state.get("world_size", loader.world_size)
    if written != loader.world_size:
        raise CheckpointError(f"the checkpoint's data position was saved per rank by {written} process(es) (an "
                              f"earlier version): resume it on {written}, not {loader.world_size}")
    return int(state["position"]) * loader.batch_size * loader.world_size


def repartition_refusal(state: dict) -> str | None:
    """Why a saved loader state cannot continue on another world size (None: it can)."""
    if "sources" in state:
        return "a --dataset mixture draws each rank's rows apart, so its data position is per rank"
    if "consumed" not in state:
        return "its data position was saved per rank (a checkpoint of an earlier version)"
    return None
