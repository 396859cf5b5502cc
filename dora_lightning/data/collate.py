"""Batching of clip samples into one memory block per batch (one shared-memory file per batch in a worker)."""

from __future__ import annotations

import multiprocessing
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils.data import default_collate, get_worker_info

ALIGNMENT = 64  # bytes: every field starts on a cache line of the batch's block


def _field_parts(key: str, values: list[Any]) -> list[tuple[Any, torch.Size, torch.dtype]] | None:
    """The tensors one field of the batch becomes, as (index or None, batched shape, dtype); None for a field left to
    ``default_collate`` (anything but tensors, sequences of tensors and numbers)."""
    first = values[0]
    if isinstance(first, Tensor):
        columns: list[tuple[Any, list[Tensor]]] = [(None, values)]
    elif isinstance(first, (list, tuple)) and all(isinstance(v, Tensor) for v in first):
        lengths = {len(v) for v in values}
        if len(lengths) > 1:
            raise ValueError(f"cannot batch field '{key}': the samples hold {sorted(lengths)} tensors")
        columns = [(i, [v[i] for v in values]) for i in range(len(first))]
    elif all(isinstance(v, bool) for v in values):
        return [(None, torch.Size([len(values)]), torch.bool)]
    elif all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return [(None, torch.Size([len(values)]), torch.int64)]
    elif all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return [(None, torch.Size([len(values)]), torch.float64)]
    else:
        return None
    parts = []
    for index, column in columns:
        if not all(isinstance(t, Tensor) for t in column):
            raise ValueError(f"cannot batch field '{key}': some samples hold a tensor there and some do not")
        shapes = {tuple(t.shape) for t in column}
        dtypes = {t.dtype for t in column}
        if len(shapes) > 1 or len(dtypes) > 1:
            name = key if index is None else f"{key}[{index}]"
            raise ValueError(
                f"cannot batch field '{name}': the samples' tensors differ in shape {sorted(shapes)} or dtype "
                f"{sorted(map(str, dtypes))}"
            )
        parts.append((index, torch.Size([len(column), *column[0].shape]), column[0].dtype))
    return parts


@dataclass
class _BatchPlan:
    """Where each tensor of a batch goes in its block: (field, index in a list field or None, shape, dtype, byte
    offset); the fields left to ``default_collate``, already batched; the block's size in bytes."""

    keys: list[str]
    layout: list[tuple[str, Any, torch.Size, torch.dtype, int]]
    others: dict[str, Any]
    size: int


def _plan(samples: Sequence[Mapping[str, Any]]) -> _BatchPlan:
    if not samples:
        raise ValueError("cannot batch an empty list of samples")
    keys = list(samples[0].keys())
    for sample in samples[1:]:
        if list(sample.keys()) != keys:
            raise ValueError(f"cannot batch samples with different fields: {keys} and {list(sample.keys())}")
    plan = _BatchPlan(keys, [], {}, 0)
    for key in keys:
        parts = _field_parts(key, [sample[key] for sample in samples])
        if parts is None:
            plan.others[key] = default_collate([sample[key] for sample in samples])
            continue
        for index, shape, dtype in parts:
            plan.layout.append((key, index, shape, dtype, plan.size))
            nbytes = shape.numel() * dtype.itemsize
            plan.size += -(-nbytes // ALIGNMENT) * ALIGNMENT
    return plan


def _fill(
    plan: _BatchPlan, samples: Sequence[Mapping[str, Any]], storage: torch.UntypedStorage
) -> dict[str, Any]:
    """The batch of ``plan``, its tensors written into ``storage``."""
    batch: dict[str, Any] = {}
    for key, index, shape, dtype, offset in plan.layout:
        out = torch.empty(0, dtype=dtype).set_(storage, offset // dtype.itemsize, shape)
        values = [sample[key] if index is None else sample[key][index] for sample in samples]
        if isinstance(values[0], Tensor):
            torch.stack(values, out=out)
        else:
            out.copy_(torch.tensor(values, dtype=dtype))
        if index is None:
            batch[key] = out
        else:
            batch.setdefault(key, []).append(out)
    # the samples' field order; an empty list of tensors stays an empty list
    return {key: plan.others[key] if key in plan.others else batch.get(key, []) for key in plan.keys}


def _new_block(size: int, shared: bool) -> torch.UntypedStorage:
    # default_collate uses the same private allocator for its shared blocks (``TypedStorage._new_shared``)
    return torch.UntypedStorage._new_shared(size) if shared and size else torch.UntypedStorage(size)


def collate_clips(samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Batch clip samples as ``default_collate`` does, with every tensor of the batch in ONE storage.

    Tensors are stacked (``(B, ...)``), lists of tensors become lists of stacked tensors, numbers become 1-D tensors
    (int64, float64, bool); other fields go through ``default_collate``. In a DataLoader worker the storage is shared
    memory, so a batch reaches the training process as a single file descriptor: ``default_collate`` makes one
    shared-memory file per tensor (10 for a DoRA batch with 6 local views), each passed through multiprocessing's
    resource sharer (a socket connection per file). Holding any tensor of a batch keeps the whole block alive.
    """
    plan = _plan(samples)
    return _fill(plan, samples, _new_block(plan.size, shared=get_worker_info() is not None))


# (worker, slot or -1, reused, (field, index) of the block's first tensor): added by RecycledBlocks.collate, removed by
# RecycledBlocks.batches
BLOCK_FIELD = "_recycled_block"


class RecycledBlocks:
    """Shared-memory batch blocks that a DataLoader's workers reuse once the training process has let go of them.

    A new shared-memory block costs its first writer a page fault and a zeroed page per 4 KiB and the training
    process an ``mmap``/``munmap`` per batch: 2.5-3 ms of the two processes' CPU per paper-scale clip more than a
    recycled block, ~9 % of the 2-worker loader's work (benchmarks/bench_handoff.py, docs/benchmarks.md). Each worker keeps up to ``blocks_per_worker`` blocks; a block
    goes back to its worker only when every tensor of the batch written into it has been freed in the training
    process (checked with a weak reference to its storage before each batch is fetched), so a batch the training
    loop holds on to is never overwritten: while all of a worker's blocks are held, it writes new blocks as
    ``collate_clips`` does. Use one instance per DataLoader iterator: pass :meth:`collate` as the loader's
    ``collate_fn`` and iterate through :meth:`batches`; ``context`` is the loader's ``multiprocessing_context`` (None:
    the default start method). Not for pinned loaders (``pin_memory=True`` hands the
    training process copies, so its weak references would see the copies, not the blocks).
    """

    def __init__(self, num_workers: int, blocks_per_worker: int = 4, context: Any = None) -> None:
        if num_workers < 1 or blocks_per_worker < 1:
            raise ValueError(
                f"RecycledBlocks needs num_workers >= 1 and blocks_per_worker >= 1, got {num_workers}, "
                f"{blocks_per_worker}"
            )
        self.blocks_per_worker = blocks_per_worker
        context = context if context is not None else multiprocessing.get_context()  # the loader's, for spawn
        self._returned = [context.SimpleQueue() for _ in range(num_workers)]
        self._pool: list[torch.UntypedStorage] = []  # this worker's blocks (each worker process has its own)
        self._free: set[int] = set()
        self._held: list[tuple[StorageWeakRef, int, int]] = []  # training process: batches not yet freed
        self.reused = self.written_new = 0  # training process: batches received in a reused / a new block

    def collate(self, samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """``collate_clips`` into one of this worker's free blocks (in the main process: ``collate_clips``)."""
        info = get_worker_info()
        plan = _plan(samples)
        if info is None or not plan.layout:  # nothing to put in a block, or no other process to hand it to
            return _fill(plan, samples, _new_block(plan.size, shared=info is not None))
        storage, slot, reused = self._block(info.id, plan.size)
        batch = _fill(plan, samples, storage)
        # the block is tracked through its first tensor: fields batched by default_collate have storages of their own
        batch[BLOCK_FIELD] = (info.id, slot, reused, plan.layout[0][:2])
        return batch

    def _block(self, worker: int, size: int) -> tuple[torch.UntypedStorage, int, bool]:
        returned = self._returned[worker]
        while not returned.empty():
            self._free.add(returned.get())
        if self._free:
            slot = self._free.pop()
            reused = self._pool[slot].nbytes() == size
            if not reused:  # a batch of other shapes: the block is replaced
                self._pool[slot] = _new_block(size, shared=True)
            return self._pool[slot], slot, reused
        if len(self._pool) < self.blocks_per_worker:
            self._pool.append(_new_block(size, shared=True))
            return self._pool[-1], len(self._pool) - 1, False
        return _new_block(size, shared=True), -1, False  # every block is held: not kept for reuse

    def release_freed(self) -> None:
        """Give back to their workers the blocks whose batches the training process has freed entirely."""
        still_held = []
        for ref, worker, slot in self._held:
            if ref.expired():
                self._returned[worker].put(slot)
            else:
                still_held.append((ref, worker, slot))
        self._held = still_held

    def batches(self, loader_iterator: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """The loader's batches, without the block bookkeeping field; frees blocks before fetching each batch."""
        while True:
            self.release_freed()
            batch = next(loader_iterator, None)
            if batch is None:
                return
            if BLOCK_FIELD not in batch:  # a batch without tensors
                yield batch
                continue
            worker, slot, reused, anchor = batch.pop(BLOCK_FIELD)
            if slot >= 0:
                key, index = anchor
                tensor = batch[key] if index is None else batch[key][index]
                self._held.append((StorageWeakRef(tensor.untyped_storage()), worker, slot))
            self.reused += int(reused)
            self.written_new += int(not reused)
            yield batch
