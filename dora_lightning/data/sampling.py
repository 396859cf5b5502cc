"""Which clips each (rank x worker) shard emits in an epoch, and in what order: pure index arithmetic, no decoding.

A clip is ``clip_length`` frames ``frame_stride`` apart; every frame where a whole clip fits is a clip *start*. Each epoch,
the starts of all videos are cut into segments of ``segment_length`` starts, the segments are permuted with a seed,
and the permuted sequence is cut into equal contiguous shards, one per (rank x dataloader worker). A shard decodes
``interleave`` of its runs side by side (far-apart moments of the video) and passes the clips through a shuffle buffer.
Because the emission order is computed here from indices alone, a resumed run can skip what was consumed without
decoding it, and the same seed gives the same clips on any machine.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ClipSpec:
    """Clip geometry in frames: ``clip_length`` frames, ``frame_stride`` apart."""

    clip_length: int
    frame_stride: int

    def __post_init__(self) -> None:
        if self.clip_length < 1:
            raise ValueError(f"data.clip_length must be >= 1, got {self.clip_length}")
        if self.frame_stride < 1:
            raise ValueError(f"data.frame_stride must be >= 1, got {self.frame_stride}")

    @property
    def span(self) -> int:
        """Frames from a clip's first to its last frame, inclusive."""
        return (self.clip_length - 1) * self.frame_stride + 1

    def frames(self, start: int) -> np.ndarray:
        """Frame indices of the clip that starts at ``start``."""
        return start + self.frame_stride * np.arange(self.clip_length)

    def num_starts(self, num_frames: int) -> int:
        """Clip starts in a video of ``num_frames`` frames."""
        return max(0, num_frames - self.span + 1)


@dataclass(frozen=True)
class Run:
    """A contiguous range of clip starts ``[start, stop)`` in video ``video``, decoded sequentially by one reader."""

    video: int
    start: int
    stop: int

    def __len__(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class ShardPlan:
    """The clips one shard emits in one epoch: ``runs`` and, in emission order, each clip's run index and start."""

    runs: list[Run]
    run_index: np.ndarray
    starts: np.ndarray

    def __len__(self) -> int:
        return len(self.starts)


def epoch_segments(num_starts: Sequence[int], segment_length: int, seed: int, epoch: int) -> list[Run]:
    """All segments of all videos, permuted by (seed, epoch)."""
    if segment_length < 1:
        raise ValueError(f"data.segment_length must be >= 1, got {segment_length}")
    segments = [
        Run(video, begin, min(begin + segment_length, count))
        for video, count in enumerate(num_starts)
        for begin in range(0, count, segment_length)
    ]
    order = np.random.default_rng([seed, epoch]).permutation(len(segments))
    return [segments[i] for i in order]


def shard_runs(segments: Sequence[Run], shard: int, num_shards: int) -> list[Run]:
    """The ``shard``-th of ``num_shards`` equal contiguous pieces of the segments' concatenated starts.

    Every shard gets ``total // num_shards`` starts; the remaining ``total % num_shards`` starts at the end of the
    permuted sequence are left out this epoch (a different few each epoch, like DistributedSampler's drop_last).
    """
    per_shard = sum(len(s) for s in segments) // num_shards
    lo, hi = shard * per_shard, (shard + 1) * per_shard
    pieces: list[Run] = []
    offset = 0
    for seg in segments:
        seg_lo, seg_hi = offset, offset + len(seg)
        offset = seg_hi
        a, b = max(lo, seg_lo), min(hi, seg_hi)
        if a < b:
            pieces.append(Run(seg.video, seg.start + a - seg_lo, seg.start + b - seg_lo))
        if offset >= hi:
            break
    return pieces


def split_for_interleave(runs: Sequence[Run], interleave: int, min_length: int) -> list[Run]:
    """Split runs so at least ``interleave`` can be decoded side by side, never below ``min_length`` starts each.

    ``min_length`` keeps the decode overhead bounded: a run of L starts decodes L + span - 1 frames.
    """
    runs = list(runs)
    total = sum(len(r) for r in runs)
    if len(runs) >= interleave or total == 0:
        return runs
    pieces = max(len(runs), min(interleave, total // max(min_length, 1)))
    if pieces <= len(runs):
        return runs
    out: list[Run] = []
    for run in runs:
        share = max(1, round(pieces * len(run) / total))
        bounds = np.linspace(run.start, run.stop, share + 1).round().astype(int)
        out.extend(
            Run(run.video, int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a
        )
    return out


def interleave_order(runs: Sequence[Run], interleave: int) -> tuple[np.ndarray, np.ndarray]:
    """Insertion order of clips: round-robin over ``interleave`` active runs, the next run taking a finished one's slot."""
    run_index: list[int] = []
    starts: list[int] = []
    pending = list(range(len(runs)))[::-1]
    active = [[i, runs[i].start] for i in (pending.pop() for _ in range(min(interleave, len(pending))))]
    while active:
        still_active = []
        for slot in active:
            idx, nxt = slot
            run_index.append(idx)
            starts.append(nxt)
            slot[1] += 1
            if slot[1] < runs[idx].stop:
                still_active.append(slot)
            elif pending:
                new = pending.pop()
                still_active.append([new, runs[new].start])
        active = still_active
    return np.asarray(run_index, dtype=np.int64), np.asarray(starts, dtype=np.int64)


def shuffle_buffer_order(count: int, buffer_size: int, rng: np.random.Generator) -> np.ndarray:
    """Emission order of ``count`` items passed through a shuffle buffer of ``buffer_size`` (a permutation).

    The buffer fills up, then each new item replaces a uniformly drawn buffered item, which is emitted; at the end the
    buffer is emitted in random order. ``buffer_size <= 1`` keeps the insertion order.
    """
    if buffer_size <= 1 or count <= 1:
        return np.arange(count)
    size = min(buffer_size, count)
    buffer = list(range(size))
    draws = rng.integers(0, size, count - size)
    out = np.empty(count, dtype=np.int64)
    for step, item in enumerate(range(size, count)):
        slot = draws[step]
        out[step] = buffer[slot]
        buffer[slot] = item
    out[count - size :] = np.asarray(buffer)[rng.permutation(size)]
    return out


def plan_shard(
    num_starts: Sequence[int],
    spec: ClipSpec,
    *,
    shard: int,
    num_shards: int,
    segment_length: int,
    interleave: int,
    shuffle_buffer: int,
    seed: int,
    epoch: int,
    multiple_of: int = 1,
) -> ShardPlan:
    """The emission plan of one shard for one epoch, truncated to a multiple of ``multiple_of`` clips (whole batches)."""
    segments = epoch_segments(num_starts, segment_length, seed, epoch)
    runs = split_for_interleave(
        shard_runs(segments, shard, num_shards), interleave, min_length=2 * (spec.span - 1)
    )
    run_index, starts = interleave_order(runs, interleave)
    order = shuffle_buffer_order(len(starts), shuffle_buffer, np.random.default_rng([seed, epoch, shard, 1]))
    keep = len(order) - len(order) % multiple_of
    order = order[:keep]
    return ShardPlan(runs=runs, run_index=run_index[order], starts=starts[order])


def clips_per_shard(num_starts: Sequence[int], num_shards: int, multiple_of: int = 1) -> int:
    """How many clips each shard emits per epoch (all shards emit the same number, so DDP ranks stay in step)."""
    per_shard = sum(num_starts) // num_shards
    return per_shard - per_shard % multiple_of
