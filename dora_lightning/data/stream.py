"""The clip stream: an IterableDataset whose workers each decode many far-apart cursors sequentially and emit clips
in the planned order (dora_lightning/data/sampling.py: one clip of each of ``batch_size`` cursors per batch)."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from dora_lightning.data.decode_stats import DecodeStats, WarnedOnce
from dora_lightning.data.epoch_rest import EpochRest, Layout, batches_taken, consumed_starts, emitting_workers
from dora_lightning.data.reader import RangeReader, to_pixels
from dora_lightning.data.sampling import (
    ClipSpec,
    Run,
    ShardPlan,
    clips_per_shard,
    cursors_per_worker,
)
from dora_lightning.data.sources import VideoInfo

ClipTransform = Callable[[torch.Tensor, torch.Generator], dict[str, Any]]
"""Called with a clip's uint8 (T, H, W, C) frames and a seeded generator; returns the sample's fields. A transform
whose ``accepts_frame_list`` attribute is true gets the T (H, W, C) frames as a list instead (saves stacking them into
a new tensor: ClipMultiCrop reads only the crop regions), and one with a ``frame_format`` attribute gets frames in that
pixel format (see :attr:`VideoClipStream.pixel_format`)."""


def clip_seed(seed: int, epoch: int, video: int, start: int) -> int:
    """The augmentation seed of one clip: the same clip gets the same crops whichever worker or rank emits it."""
    return int(np.random.SeedSequence([seed, epoch, video, start]).generate_state(1, dtype=np.uint64)[0] >> 1)


class _RunState:
    """Decoding state of one run: its reader, the frames decoded and still needed, and how many clips remain.

    A run takes every ``run.step``-th start and ``step`` divides the frame stride, so only every ``step``-th frame is
    ever needed: a cursor holds about span / step frames (the clips it has started but not finished)."""

    def __init__(self, run: Run, spec: ClipSpec, pending_starts: np.ndarray) -> None:
        self.run = run
        self.needed = np.zeros(run.stop - run.start + spec.span - 1, dtype=np.int32)
        offsets = (pending_starts - run.start)[:, None] + spec.frame_stride * np.arange(spec.clip_length)[
            None, :
        ]
        np.add.at(self.needed, offsets.ravel(), 1)
        self.first = int(pending_starts.min()) if len(pending_starts) else run.start
        self.last_frame = int(pending_starts.max()) + spec.span if len(pending_starts) else run.start
        self.remaining = len(pending_starts)
        self.frames: dict[int, np.ndarray] = {}
        self.head = self.first
        self.iterator: Iterator[tuple[int, np.ndarray | None]] | None = None
        self.reader: RangeReader | None = None
        self.exhausted = False

    def wanted(self, index: int) -> bool:
        return self.needed[index - self.run.start] > 0

    def close(self) -> None:
        if self.reader is not None:
            self.reader.close()
        self.frames.clear()
        self.exhausted = True


class VideoClipStream(IterableDataset):
    """Clips of ``spec`` from ``videos``, sharded over (rank x worker), each multi-cropped by ``transform``.

    Each worker keeps ``cursors`` decode cursors far apart in the videos, takes every ``start_step``-th clip start
    inside a cursor's stretch and fills each batch with clips of ``batch_size`` different cursors (the plan:
    :func:`~dora_lightning.data.sampling.plan_shard`); ``compact_frames`` keeps the cursors' frames as scaled YUV
    4:2:0 until a clip uses them (3/8 of the RGBA memory, one colour conversion per frame of each clip). Every shard
    emits the same number of clips per epoch (a whole number of batches), so DDP ranks stay in step and ``len()`` is
    exact. ``set_position(epoch, batches_done)`` before iterating resumes mid-epoch: each worker skips the
    batches the previous run consumed and the remaining clips come out in the same order as in an uninterrupted run;
    with an :class:`~dora_lightning.data.epoch_rest.EpochRest` the epoch began on other layouts, and the workers deal
    the starts those left (``batches`` batches of this process in all, ``batches_done`` of them already taken).
    A clip whose frames cannot be decoded (corrupt or truncated stretch, or frames the decoder reported damaged) is
    replaced by the worker's previous good clip with fresh augmentation and counted, keeping the counts equal; a
    warning names the file (damaged frames: one line per file at the epoch's end with their count, summed over the
    workers when the stream runs under :class:`~dora_lightning.data.loader.ClipLoader`).
    """

    def __init__(
        self,
        videos: Sequence[VideoInfo],
        spec: ClipSpec,
        transform: ClipTransform | None,
        *,
        batch_size: int,
        num_workers: int,
        rank: int = 0,
        world_size: int = 1,
        cursors: int | None = None,
        start_step: int = 1,
        seed: int = 0,
        decode_short_side: int | None = None,
        max_decode_retries: int = 3,
        decode_threads: int = 1,
        compact_frames: bool = False,
    ) -> None:
        super().__init__()
        self.videos, self.spec, self.transform = list(videos), spec, transform
        self.batch_size, self.num_workers = batch_size, emitting_workers(num_workers)
        self.rank, self.world_size = rank, world_size
        self.cursors = cursors_per_worker(cursors, batch_size)
        self.start_step = start_step
        self.seed, self.decode_short_side = seed, decode_short_side
        self.max_decode_retries, self.decode_threads = max_decode_retries, decode_threads
        self.compact_frames = compact_frames
        self.num_starts = [spec.num_starts(v.num_frames) for v in self.videos]
        self.epoch, self.batches_done = 0, 0
        self.rest: EpochRest | None = None
        self._taken: np.ndarray | None = None  # the starts the rest's earlier layouts took
        # where each worker puts its end-of-epoch counters (ClipLoader sets a queue and warns once for all workers);
        # None: each worker warns its own lines
        self.report_sink: Any = None
        # which files' problems have been named already, across the loader's workers (ClipLoader sets it); None: each
        # worker names them once per epoch
        self.warned_once: WarnedOnce | None = None

    @property
    def pixel_format(self) -> str:
        """What frames are decoded to: the transform's ``frame_format`` if it has one (ClipMultiCrop's default
        backends read RGBA crops fastest), else ``"rgb24"``; the ``frames`` of a stream without a transform are
        always (T, H, W, 3)."""
        return getattr(self.transform, "frame_format", "rgb24")

    @property
    def num_shards(self) -> int:
        return self.world_size * self.num_workers

    @property
    def clips_per_worker(self) -> int:
        return clips_per_shard(self.num_starts, self.num_shards, self.batch_size)

    def __len__(self) -> int:
        return self.num_workers * self.clips_per_worker

    def set_position(self, epoch: int, batches_done: int = 0, rest: EpochRest | None = None) -> None:
        """Start the next iteration at ``epoch`` after ``batches_done`` batches of it (a resumed run); with ``rest``,
        after ``batches_done`` batches of the rest of an epoch begun on other layouts. The starts those took are
        found here, before the workers start."""
        self.epoch, self.batches_done, self.rest = epoch, batches_done, rest
        self._taken = None
        if rest is not None:
            self._taken = consumed_starts(
                self.num_starts,
                self.spec,
                rest.earlier,
                start_step=self.start_step,
                seed=self.seed,
                epoch=epoch,
            )

    def shard_plan(self, logical_worker: int) -> ShardPlan:
        """The emission plan of this rank's ``logical_worker`` for the current epoch (of its rest, if it began on
        other layouts)."""
        layout = Layout(self.world_size, self.num_workers, self.batch_size, self.cursors)
        (plan,) = layout.plans(
            self.num_starts,
            self.spec,
            [self.rank * self.num_workers + logical_worker],
            start_step=self.start_step,
            seed=self.seed,
            epoch=self.epoch,
            exclude=self._taken,
        )
        return plan

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker_id = info.id if info is not None else 0
        if (info.num_workers if info is not None else 1) != self.num_workers:
            raise RuntimeError(
                f"VideoClipStream was built for {self.num_workers} workers but runs in "
                f"{info.num_workers if info else 1}; build it through VideoClipDataModule"
            )
        done = self.batches_done
        logical = (worker_id + done) % self.num_workers
        plan = self.shard_plan(logical)
        end = len(plan)
        if self.rest is not None:  # this worker's share of the rest's batches
            end = min(end, batches_taken(self.rest.batches, self.num_workers, logical) * self.batch_size)
        yield from self._emit(plan, batches_taken(done, self.num_workers, logical) * self.batch_size, end)

    def _emit(self, plan: ShardPlan, begin: int, end: int) -> Iterator[dict[str, Any]]:
        run_index, starts = plan.run_index[begin:end], plan.starts[begin:end]
        states = {
            r: _RunState(plan.runs[r], self.spec, starts[run_index == r])
            for r in np.unique(run_index).tolist()
        }
        stats = DecodeStats(epoch=self.epoch, shared=self.warned_once)
        reported = 0
        last_good: tuple[list[np.ndarray], int] | None = None
        debt: list[tuple[int, int]] = []
        try:
            for r, start in zip(run_index.tolist(), starts.tolist(), strict=True):
                state = states[r]
                frames = self._gather(state, start, stats)
                state.remaining -= 1
                if state.remaining == 0:
                    state.close()
                video = state.run.video
                if frames is None:
                    stats.substituted_clips += 1
                    debt.append((video, start))
                    if last_good is None:
                        continue
                else:
                    last_good = (frames, video)
                    debt.insert(0, (video, start))
                for clip_video, clip_start in debt:
                    sample = self._sample(
                        last_good[0], clip_video, clip_start, stats.decoded_frames - reported
                    )
                    reported = stats.decoded_frames
                    yield sample
                debt.clear()
            if (
                self.report_sink is not None
            ):  # ClipLoader merges the workers' reports: one line per file and epoch
                self.report_sink.put(stats.report())
            else:
                for line in stats.epoch_lines():
                    warnings.warn(line, RuntimeWarning, stacklevel=2)
            if debt:
                paths = sorted({self.videos[state.run.video].path for state in states.values()})
                raise RuntimeError(
                    f"no clip of this worker's share could be decoded from {paths}: the files look corrupt"
                )
        finally:
            for state in states.values():
                state.close()

    def _gather(self, state: _RunState, start: int, stats: DecodeStats) -> list[np.ndarray] | None:
        """Decode ``state``'s run up to the clip's last frame; return the clip's frames, or None if some are missing."""
        clip = self.spec.frames(start)
        if state.iterator is None and not state.exhausted:
            video = self.videos[state.run.video]
            state.reader = RangeReader(
                video,
                state.first,
                state.last_frame,
                video.decode_size(self.decode_short_side),
                state.wanted,
                stats,
                self.max_decode_retries,
                self.decode_threads,
                self.pixel_format,
                self.compact_frames,
            )
            state.iterator = iter(state.reader)
        last = int(clip[-1])
        while state.head <= last and not state.exhausted:
            item = next(state.iterator, None)
            if item is None:
                state.exhausted = True
                break
            index, frame = item
            if frame is not None:
                state.frames[index] = frame
            state.head = index + 1
        frames = [state.frames.get(int(f)) for f in clip]
        offsets = clip - state.run.start
        state.needed[offsets] -= 1
        for f in clip[state.needed[offsets] == 0].tolist():
            state.frames.pop(f, None)
        if any(frame is None for frame in frames):
            video = self.videos[state.run.video]
            damaged = state.reader.damaged if state.reader is not None else set()
            absent = [
                int(f)
                for f, frame in zip(clip, frames, strict=True)
                if frame is None and int(f) not in damaged
            ]
            if not absent:
                return None  # damaged frames only: counted by the reader, reported once per file at the epoch's end
            stats.missing_frames += len(absent)
            reason = "ends early (truncated?)" if state.exhausted else "has an undecodable stretch"
            stats.warn_once(
                video.path,
                "missing",
                f"'{video.path}' {reason}: frames {clip.tolist()} of a clip could not be decoded (header says "
                f"{video.num_frames} frames); such clips are replaced by the previous good clip and counted",
            )
            return None
        return frames

    def _sample(self, frames: list[np.ndarray], video: int, start: int, decoded: int) -> dict[str, Any]:
        tensors = [torch.from_numpy(to_pixels(frame, self.pixel_format)) for frame in frames]
        if self.transform is None:
            views: dict[str, Any] = {"frames": torch.stack(tensors)}
        else:
            generator = torch.Generator().manual_seed(clip_seed(self.seed, self.epoch, video, start))
            clip = tensors if getattr(self.transform, "accepts_frame_list", False) else torch.stack(tensors)
            views = self.transform(clip, generator)
        return {
            **views,
            "video": video,
            "start": start,
            "clip_index": torch.tensor([video, start], dtype=torch.int64),
            "decoded_frames": decoded,
        }
