"""Samplers for evaluation loaders under DDP: every validation item scored exactly once.

Lightning's default for a validation loader under DDP is a ``DistributedSampler``, which pads the shards to equal
length by repeating items; metrics summed over processes (torchmetrics, confusion matrices) then count the repeats
twice. :func:`unrepeated_sampler` gives each process a disjoint share instead (shares differ by at most one item).
Lightning keeps a loader's sampler when it already is a ``DistributedSampler``, so a loader built with it is used
as is.
"""

from __future__ import annotations

from collections.abc import Sized

from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DistributedSampler

__all__ = ["unrepeated_sampler"]


def unrepeated_sampler(dataset: Sized, rank: int = 0, world_size: int = 1) -> DistributedSampler | None:
    """The sampler of an evaluation loader for process ``rank`` of ``world_size``.

    None with one process (the loader keeps the data set's order); otherwise Lightning's
    ``UnrepeatedDistributedSampler`` (not shuffled): process ``rank`` takes items ``rank, rank + world_size, ...``, so
    every item is in exactly one share and none is repeated.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if world_size == 1:
        return None
    if 0 < len(dataset) < world_size:
        raise ValueError(
            f"{len(dataset)} evaluation item(s) cannot be shared by {world_size} processes (each needs at least "
            "one); run on fewer devices"
        )
    return UnrepeatedDistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=False)
