"""Which clips each (rank x worker) shard emits in an epoch, and in what order: pure index arithmetic, no decoding.

A clip is ``clip_length`` frames ``frame_stride`` apart; every frame where a whole clip fits is a clip *start*. A batch
must look like independent uniform draws over all videos (docs/data.md), yet frames are decoded sequentially. So each
worker keeps ``cursors`` decode cursors at far-apart moments and fills every batch with clips of different cursors.

The epoch plan, from ``(seed, epoch)``:

1. The videos' starts are laid end to end on one axis of N starts. With ``start_step`` s, the starts fall into s
   residue classes (local start index mod s); a cursor only ever takes starts of one class, so the frames it holds are
   every s-th frame (s divides ``frame_stride``).
2. The classes are concatenated, in a seeded order, each rotated to begin at a seeded point ``u`` plus one lane further
   than the previous class, into a sequence Z of all N starts. Z is cut into C = shards x cursors chunks: one chunk is
   one cursor's work for the epoch, a stretch of about s x N / C frames of which it takes every s-th start.
3. The chunks sit ``N / C`` starts apart on the axis (the classes are shifted by one lane each) and all cursors advance
   at the same pace, so they stay that far apart all epoch. Chunks are dealt to (rank, worker, cursor) by position
   (lane m -> cursor m // shards, slot m % shards = worker slot x ranks + rank slot, slots permuted each epoch): the
   cursors of one worker are N / cursors apart, those of one rank N / (cursors x workers) apart.
4. A worker cycles over its cursors in a fixed order made of ``cursors / batch_size`` sets of ``batch_size`` cursors
   spread over the whole axis, so a batch takes one clip from each cursor of a set and consecutive batches of a worker
   use different sets. When a batch's clips cannot all be a clip span apart (batch_size x span > N), the sets are made
   of small blocks of neighbouring cursors instead, which keeps the blocks more than a span apart.

Every shard gets exactly ``N // shards`` starts and emits the largest multiple of the batch size of them, so every
start is used at most once per epoch and all but fewer than ``shards x batch_size`` each epoch (those rotate with the
seeded rotation). Because the emission order is computed from indices alone, a resumed run can skip what was consumed
without decoding it, and the same seed gives the same clips on any machine.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

PLAN_TAG = 0x5A17  # keeps the plan's random stream apart from other uses of (seed, epoch)


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
    """Clip starts ``start, start + step, ...`` below ``stop`` in video ``video``, decoded sequentially by one reader."""

    video: int
    start: int
    stop: int
    step: int = 1

    def __len__(self) -> int:
        return max(0, -(-(self.stop - self.start) // self.step))

    def starts(self) -> np.ndarray:
        return np.arange(self.start, self.stop, self.step, dtype=np.int64)


@dataclass(frozen=True)
class ShardPlan:
    """The clips one shard emits in one epoch: ``runs`` and, in emission order, each clip's run index, start and
    cursor. A cursor works through its runs one after another (at most one reader open per cursor)."""

    runs: list[Run]
    run_index: np.ndarray
    starts: np.ndarray
    cursor: np.ndarray

    def __len__(self) -> int:
        return len(self.starts)

    @property
    def videos(self) -> np.ndarray:
        """Video index of each emitted clip."""
        return np.asarray([r.video for r in self.runs], dtype=np.int64)[self.run_index]


def distinct_moments(videos: np.ndarray, starts: np.ndarray, span: int) -> int:
    """Distinct moments among clips given by (video, start): per video, the sorted starts are grouped wherever
    consecutive ones are at most ``span`` frames apart; the number of groups over all videos."""
    videos, starts = np.asarray(videos, dtype=np.int64), np.asarray(starts, dtype=np.int64)
    if len(starts) == 0:
        return 0
    order = np.lexsort((starts, videos))
    v, s = videos[order], starts[order]
    new_group = (v[1:] != v[:-1]) | (s[1:] - s[:-1] > span)
    return 1 + int(new_group.sum())


def mean_pairwise_gap(videos: np.ndarray, starts: np.ndarray) -> float:
    """Mean |start_i - start_j| over the pairs of clips of the same video (NaN when there is no such pair)."""
    videos, starts = np.asarray(videos, dtype=np.int64), np.asarray(starts, dtype=np.float64)
    total, pairs = 0.0, 0
    for v in np.unique(videos):
        s = np.sort(starts[videos == v])
        n = len(s)
        if n < 2:
            continue
        # sum over pairs of (s_j - s_i), i < j, for sorted s: sum_k s_k (2k - n + 1)
        total += float(np.dot(s, 2 * np.arange(n) - n + 1))
        pairs += n * (n - 1) // 2
    return total / pairs if pairs else float("nan")


def _residue_class(num_starts: Sequence[int], bases: np.ndarray, step: int, residue: int) -> np.ndarray:
    """Axis positions of the starts whose index within their video is ``residue`` mod ``step``, in axis order."""
    parts = [
        base + np.arange(residue, count, step, dtype=np.int64)
        for base, count in zip(bases, num_starts, strict=True)
    ]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def cursor_order(num_cursors: int, batch_size: int, worker_spacing: float, span: int) -> np.ndarray:
    """The order in which a worker visits its cursors (numbered by position along the axis), one clip per visit.

    The cursors form ``num_cursors / batch_size`` interleaved sets, one set per batch: set j holds the blocks of
    ``b`` neighbouring cursors whose block number is j mod sets. ``b`` is 1 when the set's cursors can all be more than
    a clip span apart; otherwise it is the smallest block that keeps neighbouring blocks of a set more than a span
    apart (``worker_spacing``: starts between neighbouring cursors of the worker).
    """
    sets = max(1, num_cursors // max(batch_size, 1))
    block = 1
    if sets > 1 and worker_spacing > 0:
        lanes = math.floor(span / worker_spacing) + 1  # gap in cursor numbers that clears a span
        block = max(1, math.ceil((lanes - 1) / (sets - 1)))
    blocks = np.arange(num_cursors) // block
    return np.lexsort((np.arange(num_cursors), blocks // sets, blocks % sets))


def plan_shard(num_starts: Sequence[int], spec: ClipSpec, *, shard: int, **options: Any) -> ShardPlan:
    """The emission plan of one shard (``rank * workers_per_rank + worker``) for one epoch: a whole number of batches
    of ``batch_size`` clips, from ``cursors`` decode cursors (see the module docstring); ``options`` are those of
    :func:`plan_shards`."""
    (plan,) = plan_shards(num_starts, spec, shards=[shard], **options)
    return plan


def plan_shards(
    num_starts: Sequence[int],
    spec: ClipSpec,
    *,
    shards: Sequence[int],
    num_shards: int,
    batch_size: int,
    cursors: int,
    start_step: int = 1,
    workers_per_rank: int = 1,
    seed: int,
    epoch: int,
    exclude: np.ndarray | None = None,
) -> list[ShardPlan]:
    """The plans of ``shards`` for one epoch (:func:`plan_shard` of each; the work on the whole axis, Z and its
    chunks, is shared).

    ``exclude`` (a bool per start of the axis) leaves those starts out before Z is cut into chunks: the rest of an
    epoch begun on another layout (:mod:`dora_lightning.data.epoch_rest`) deals the starts not yet taken."""
    if num_shards % workers_per_rank or any(not 0 <= shard < num_shards for shard in shards):
        raise ValueError(f"shards {list(shards)} of {num_shards} with {workers_per_rank} workers per rank")
    if cursors < 1 or start_step < 1 or batch_size < 1:
        raise ValueError(
            f"cursors, start_step and batch_size must be >= 1: {cursors}, {start_step}, {batch_size}"
        )
    counts = np.asarray(num_starts, dtype=np.int64)
    total = int(counts.sum())
    if exclude is not None and len(exclude) != total:
        raise ValueError(f"exclude holds {len(exclude)} flags for {total} starts")
    available = total if exclude is None else total - int(np.count_nonzero(exclude))
    per_shard = available // num_shards
    keep = per_shard - per_shard % batch_size
    empty = np.zeros(0, dtype=np.int64)
    if keep == 0:
        return [ShardPlan([], empty, empty, empty) for _ in shards]
    ranks = num_shards // workers_per_rank
    num_chunks = num_shards * cursors
    lane = total / num_chunks
    bases = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    rng = np.random.default_rng([seed, epoch, PLAN_TAG])
    rotation = int(rng.integers(total))
    class_order = rng.permutation(start_step)
    worker_slot = rng.permutation(workers_per_rank)
    rank_slot = rng.permutation(ranks)

    # 2. Z: the residue classes, each rotated to begin one lane after the previous one
    pieces = []
    for a, residue in enumerate(class_order.tolist()):
        cls = _residue_class(counts.tolist(), bases, start_step, residue)
        begin = int(np.searchsorted(cls, (rotation + a * lane) % total))
        pieces.append(np.roll(cls, -begin))
    z = np.concatenate(pieces)
    if exclude is not None:
        z = z[~exclude[z]]
    z = z[: per_shard * num_shards]

    # 3. chunks of equal size -> their lanes (rank of their first position along the axis from the rotation point)
    approx = np.round(np.arange(num_chunks) * (len(z) / num_chunks)).astype(np.int64)
    first = (z[np.minimum(approx, len(z) - 1)] - rotation) % total
    lane_of_chunk = np.empty(num_chunks, dtype=np.int64)
    lane_of_chunk[np.argsort(first, kind="stable")] = np.arange(num_chunks)
    slot, cursor_of_chunk = lane_of_chunk % num_shards, lane_of_chunk // num_shards
    owner = np.empty(num_shards, dtype=np.int64)  # slot -> shard
    for rank in range(ranks):
        for worker in range(workers_per_rank):
            owner[worker_slot[worker] * ranks + rank_slot[rank]] = rank * workers_per_rank + worker
    shard_of_chunk = owner[slot]
    # exact sizes: each shard's per_shard starts split evenly over its cursors (in position order)
    k = cursor_of_chunk
    sizes = (k + 1) * per_shard // cursors - k * per_shard // cursors
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    order = cursor_order(cursors, batch_size, total / cursors, spec.span)
    return [
        _shard_plan(z, bounds, np.flatnonzero(shard_of_chunk == shard), k, bases, order, start_step, keep)
        for shard in shards
    ]


def _shard_plan(
    z: np.ndarray,
    bounds: np.ndarray,
    mine: np.ndarray,
    cursor_of_chunk: np.ndarray,
    bases: np.ndarray,
    order: np.ndarray,
    start_step: int,
    keep: int,
) -> ShardPlan:
    """One shard's plan from its chunks of Z (``mine``; steps 3-4 of the module docstring)."""
    # this shard's cursors: their starts, cut into runs at video changes and jumps
    k, cursors = cursor_of_chunk, len(order)
    runs: list[Run] = []
    clips: list[
        tuple[np.ndarray, np.ndarray]
    ] = []  # per cursor (by position): run index and start of each clip
    for chunk in mine[np.argsort(k[mine])].tolist():
        positions = z[bounds[chunk] : bounds[chunk + 1]]
        video = np.searchsorted(bases, positions, side="right") - 1
        local = positions - bases[video]
        cut = np.flatnonzero((video[1:] != video[:-1]) | (local[1:] - local[:-1] != start_step)) + 1
        run_of = np.zeros(len(positions), dtype=np.int64)
        for lo, hi in zip(
            np.concatenate([[0], cut]).tolist(), np.concatenate([cut, [len(positions)]]).tolist(), strict=True
        ):
            if hi > lo:
                run_of[lo:hi] = len(runs)
                runs.append(Run(int(video[lo]), int(local[lo]), int(local[hi - 1]) + 1, start_step))
        clips.append((run_of, local))

    # 4. round-robin over the cursors in the batch-set order
    longest = max(len(c[1]) for c in clips)
    run_index = np.full((longest, cursors), -1, dtype=np.int64)
    starts = np.zeros((longest, cursors), dtype=np.int64)
    for column, c in enumerate(order.tolist()):
        run_of, local = clips[c]
        run_index[: len(local), column] = run_of
        starts[: len(local), column] = local
    cursor = np.broadcast_to(order, run_index.shape).ravel()
    valid = run_index.ravel() >= 0
    run_index, starts, cursor = run_index.ravel()[valid], starts.ravel()[valid], cursor[valid]
    return ShardPlan(runs=runs, run_index=run_index[:keep], starts=starts[:keep], cursor=cursor[:keep].copy())


def cursors_per_worker(cursors: int | None, batch_size: int) -> int:
    """The decode cursors of each worker: ``cursors``, or by default 2 x ``batch_size``, so that consecutive batches of
    a worker come from different sets of cursors."""
    return cursors if cursors is not None else 2 * batch_size


def clips_per_shard(num_starts: Sequence[int], num_shards: int, multiple_of: int = 1) -> int:
    """How many clips each shard emits per epoch (all shards emit the same number, so DDP ranks stay in step)."""
    per_shard = sum(num_starts) // num_shards
    return per_shard - per_shard % multiple_of
