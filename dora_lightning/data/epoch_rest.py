"""The rest of an epoch on another layout: which clip starts an epoch's earlier layouts took, and how this layout
deals the others (pure index arithmetic, no decoding).

A *layout* is how an epoch's clips are dealt: processes x loader workers, each worker's batch size and decode
cursors (:func:`dora_lightning.data.sampling.plan_shard`). A run resumed on another layout (a preempted 8-GPU job
continued on 4 GPUs, or on a machine with other CPU counts) cannot skip "the first k batches" of its own plans: they
are not the clips the checkpoint's run took. Instead, the starts the earlier layouts took are replayed from their
plans (the plans are functions of the seed and the epoch alone) and left out of this layout's plans for the rest of
the epoch, so every start is still used at most once per epoch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from dora_lightning.data.sampling import ClipSpec, ShardPlan, clips_per_shard, plan_shards

__all__ = [
    "EpochRest",
    "Layout",
    "Segment",
    "batches_taken",
    "consumed_starts",
    "continue_epoch",
    "emitting_workers",
    "rest_batches_available",
]


def emitting_workers(num_workers: int) -> int:
    """Loader workers per process that emit batches for ``data.num_workers``: 0 (the main process loads) deals the
    clips as one worker does."""
    return max(1, num_workers)


@dataclass(frozen=True)
class Layout:
    """How an epoch's clips are dealt: ``world_size`` processes x ``num_workers`` loader workers, ``batch_size`` clips
    per batch and process, ``cursors`` decode cursors per worker. ``num_workers`` 0 (the main process loads) deals
    the clips as one worker does, and is stored as 1: the two are one layout, and a resume between them is exact."""

    world_size: int
    num_workers: int
    batch_size: int
    cursors: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "num_workers", emitting_workers(self.num_workers))

    @property
    def num_shards(self) -> int:
        return self.world_size * self.num_workers

    def plans(
        self,
        num_starts: Sequence[int],
        spec: ClipSpec,
        shards: Sequence[int],
        *,
        start_step: int,
        seed: int,
        epoch: int,
        exclude: np.ndarray | None = None,
    ) -> list[ShardPlan]:
        """The epoch's plans of ``shards`` on this layout (:func:`~dora_lightning.data.sampling.plan_shards`)."""
        return plan_shards(
            num_starts,
            spec,
            shards=shards,
            num_shards=self.num_shards,
            batch_size=self.batch_size,
            cursors=self.cursors,
            start_step=start_step,
            workers_per_rank=self.num_workers,
            seed=seed,
            epoch=epoch,
            exclude=exclude,
        )

    def describe(self, cursors: bool = False) -> str:
        """``P processes x W workers x batch B`` (``cursors``: and ``x C cursors``, for a change of cursors alone)."""
        processes = "process" if self.world_size == 1 else "processes"
        workers = "worker" if self.num_workers == 1 else "workers"
        text = f"{self.world_size} {processes} x {self.num_workers} {workers} x batch {self.batch_size}"
        return f"{text} x {self.cursors} cursors" if cursors else text


@dataclass(frozen=True)
class Segment:
    """A part of an epoch: ``batches`` batches taken by each process on ``layout``."""

    layout: Layout
    batches: int


@dataclass(frozen=True)
class EpochRest:
    """The rest of an epoch begun on other layouts: the parts they took (``earlier``, in order), the batches each
    process of this layout takes from the starts they left (``batches``), and the epoch's batch count where this
    layout's part began (``start``)."""

    earlier: tuple[Segment, ...]
    batches: int
    start: int = 0


def batches_taken(batches_done: int, workers: int, logical_worker: int) -> int:
    """Batches logical worker ``logical_worker`` of a process has given after ``batches_done`` batches of that
    process: the loader takes one batch of each worker in turn."""
    return batches_done // workers + (1 if logical_worker < batches_done % workers else 0)


def consumed_starts(
    num_starts: Sequence[int],
    spec: ClipSpec,
    segments: Sequence[Segment],
    *,
    start_step: int,
    seed: int,
    epoch: int,
) -> np.ndarray:
    """A bool per start of the axis (the videos' starts end to end): True where one of ``segments`` took it.

    The first segment dealt the whole epoch; each later one dealt the starts its predecessors left."""
    counts = np.asarray(num_starts, dtype=np.int64)
    bases = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    taken = np.zeros(int(counts.sum()), dtype=bool)
    for index, segment in enumerate(segments):
        layout = segment.layout
        clips = {
            shard: batches_taken(segment.batches, layout.num_workers, shard % layout.num_workers)
            * layout.batch_size
            for shard in range(layout.num_shards)
        }
        shards = [shard for shard, count in clips.items() if count]
        exclude = taken.copy() if index else None
        plans = layout.plans(
            num_starts, spec, shards, start_step=start_step, seed=seed, epoch=epoch, exclude=exclude
        )
        for shard, plan in zip(shards, plans, strict=True):
            taken[bases[plan.videos[: clips[shard]]] + plan.starts[: clips[shard]]] = True
    return taken


def rest_batches_available(num_starts: Sequence[int], taken: np.ndarray, layout: Layout) -> int:
    """Batches each process of ``layout`` can take from the starts not ``taken`` (every shard gets as many)."""
    left = int(np.count_nonzero(~taken))
    return (
        layout.num_workers
        * clips_per_shard([left], layout.num_shards, layout.batch_size)
        // layout.batch_size
    )


def continue_epoch(
    clips_taken: int, available: int, batches_per_epoch: int, layout: Layout, accumulate: int
) -> tuple[int, int]:
    """Where an epoch begun on other layouts stands on ``layout``: (batches already done, batches still to take),
    each counted per process, which sum to ``batches_per_epoch``.

    Done: the ``clips_taken`` in this layout's batches (a global batch of batch_size x processes clips), at least as
    many as leave ``available`` batches for the rest and at least one when a clip was taken, rounded up to a whole
    optimiser step (``accumulate`` batches) so that the steps keep their size. The rest is then at most
    ``available``; (``batches_per_epoch``, 0) when the earlier layouts took the whole epoch."""
    per_batch = layout.batch_size * layout.world_size
    done = max(round(clips_taken / per_batch), batches_per_epoch - available, 1 if clips_taken else 0)
    done = math.ceil(done / accumulate) * accumulate
    done = min(done, batches_per_epoch)
    return done, batches_per_epoch - done
