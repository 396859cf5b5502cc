"""ClipLoader: the DataLoader of VideoClipDataModule, which starts each iteration at the saved position."""

from __future__ import annotations

import atexit
import gc
import multiprocessing
import queue
import signal
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch.distributed as dist
from torch.utils.data import DataLoader

from dora_lightning.data.collate import RecycledBlocks, collate_clips
from dora_lightning.data.decode_stats import DecodeStats, WarnedOnce
from dora_lightning.data.stream import VideoClipStream

_END = object()  # an iteration's end, one batch ahead
WORKER_IGNORES = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


def shield_worker_from_stop_signals(worker_id: int) -> None:
    """A loader worker's start: it ignores Ctrl-C, SIGTERM and the user signals (SLURM's requeue signal is SIGUSR1 by
    default). Sent to the whole process group or job step (a terminal, SLURM, ``pkill``, a repeated ``kill``), they
    would end it, and the training process would fail on its next batch (or while it saves) before it can stop
    cleanly; the training process decides (:class:`dora_lightning.stopping.StopCheckpoint`) and ends its workers
    itself, and a worker whose training process has died exits on its own (PyTorch's watchdog). Ignored, not handled
    in Python: forked workers would otherwise run the training process's handlers (Lightning's broadcasts on the
    process group, or its SLURM handler's checkpoint and requeue)."""
    for signum in WORKER_IGNORES:
        signal.signal(signum, signal.SIG_IGN)


def reports_of_all_processes(reports: list[dict[str, Any]], world_size: int) -> list[dict[str, Any]] | None:
    """The end-of-epoch decode reports of every process of a sharded run, on process 0; None on the others.

    Each process decodes only its share of the clips, so its own counts are a part of the epoch's: gathered, process
    0 says one line per damaged file and one of totals for the whole run (not one per process, each with its share).
    Every process reaches its loader's end after the same number of batches (the shards are equal), so the gather
    is met by all. Without a process group (or one process) the reports are returned as they are."""
    if world_size == 1 or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return reports
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, reports)
    return [report for part in gathered for report in part] if dist.get_rank() == 0 else None


def end_daemonic_children() -> None:
    """At the interpreter's exit, end the daemonic child processes still running (loader workers of an iterator still
    referenced: a failure's traceback holds it, or a script that ends with one), before multiprocessing's own exit
    handler, which sends them SIGTERM and then waits for them: loader workers ignore SIGTERM
    (:func:`shield_worker_from_stop_signals`), so that wait never ended and the process never exited. Each gets
    SIGTERM as before, and SIGKILL when it is still running a second later."""
    children = [child for child in multiprocessing.active_children() if child.daemon]
    for child in children:
        child.terminate()
    deadline = time.monotonic() + 1.0
    for child in children:
        child.join(max(0.0, deadline - time.monotonic()))
        if child.is_alive():
            child.kill()
            child.join()


class ClipLoader(DataLoader):
    """A DataLoader that tells its stream where to start (``position()``: epoch, batches already done and, for an
    epoch begun on other layouts, its rest; see ``VideoClipStream.set_position``) each time it is iterated,
    and calls ``on_first_batch`` when an iteration yields its first batch.

    Batches are made by :func:`collate_clips` (one memory block per batch); with worker processes and no pinning,
    each iteration's workers reuse their shared-memory blocks once the training process has freed the batches in
    them (:class:`RecycledBlocks`), which saves the page faults of fresh shared memory for every batch.
    """

    def __init__(
        self,
        dataset: VideoClipStream,
        position: Callable[[], tuple[Any, ...]],
        recycle_blocks: bool = True,
        on_first_batch: Callable[[], None] | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("worker_init_fn", shield_worker_from_stop_signals)
        super().__init__(dataset, collate_fn=collate_clips, **kwargs)
        # once, and after multiprocessing's exit handler (so it runs first: atexit runs the last registered first)
        atexit.unregister(end_daemonic_children)
        atexit.register(end_daemonic_children)
        self._position, self._on_first_batch = position, on_first_batch
        self.recycle_blocks = recycle_blocks
        # seconds the consumer has waited for batches, all iterations together (dora_lightning.throughput reads it)
        self.data_wait_s = 0.0
        # a damaged file is named once for all workers and epochs (its counts still come at every epoch's end)
        paths = [video.path for video in getattr(dataset, "videos", ())]
        self._warned_once = WarnedOnce(paths, self.multiprocessing_context)

    def __iter__(self) -> Iterator[Any]:
        self.dataset.set_position(*self._position())
        sink = self._report_sink()
        self.dataset.report_sink = sink  # inherited by the workers created below
        self.dataset.warned_once = self._warned_once
        if self.num_workers > 0:
            # A decoder with threads that is garbage here (an abandoned reader in a reference cycle) would be freed by
            # a worker's garbage collection after the fork, where its threads do not exist: FFmpeg then waits forever
            # on a condition variable those threads were waiting on, holding the GIL (a hung worker). Free it here.
            gc.collect()
        if not self.recycle_blocks or self.num_workers == 0 or self.pin_memory or self.persistent_workers:
            self.collate_fn = collate_clips
            return self._started(super().__iter__(), sink)
        blocks = RecycledBlocks(
            self.num_workers, blocks_per_worker=self.prefetch_factor + 3, context=self.multiprocessing_context
        )
        self.collate_fn = blocks.collate  # read by the iterator created below, and by its workers only
        return self._started(blocks.batches(super().__iter__()), sink)

    def _report_sink(self) -> Any:
        """A queue for the workers' end-of-epoch counters (a thread queue when the stream runs in this process)."""
        if self.num_workers == 0:
            return queue.SimpleQueue()
        return (self.multiprocessing_context or multiprocessing.get_context()).SimpleQueue()

    def _started(self, batches: Iterator[Any], sink: Any) -> Iterator[Any]:
        """``batches``, calling ``on_first_batch`` (if given) when the first one comes and counting the time spent
        waiting for each in :attr:`data_wait_s`; at the epoch's end, one warning line per file with damaged frames and
        one of totals, summed over the workers (and, in a multi-process run, said by process 0 for all processes:
        :func:`reports_of_all_processes`).

        The end is found one batch ahead: Lightning stops asking after ``len(loader)`` batches and never sees the
        loader's end, so the lines are said before the last batch is handed over (one more batch is held meanwhile).
        """
        batches = iter(batches)
        coming = self._waited(batches)
        if coming is not _END and self._on_first_batch is not None:
            self._on_first_batch()
        while coming is not _END:
            batch, coming = coming, self._waited(batches)
            if coming is _END:
                self._report_epoch(sink)
            yield batch

    def _waited(self, batches: Iterator[Any]) -> Any:
        """The next batch (or ``_END``), its wait added to :attr:`data_wait_s`."""
        asked = time.perf_counter()
        batch = next(batches, _END)
        self.data_wait_s += time.perf_counter() - asked
        return batch

    def _report_epoch(self, sink: Any) -> None:
        """The epoch's damage and totals lines from the workers' reports (all the workers have ended)."""
        reports = []
        while not sink.empty():
            reports.append(sink.get())
        reports = reports_of_all_processes(reports, self.dataset.world_size)
        for line in DecodeStats.merged(reports or []).epoch_lines():
            warnings.warn(line, RuntimeWarning, stacklevel=1)
