"""StopAgreement: the processes of a multi-process run agree, after each batch, whether any of them was asked to stop,
without the host ever waiting for the GPU.

Each process's request (0: none; else 1 + the signal's precedence) is made on the device by a fill kernel,
all-reduced (max) over the run's process group in the stream, and copied to pinned host memory behind an event
(:func:`~dora_lightning.host_copy.queue_to_host`). The result is read one batch later, when the GPU has long finished
that batch, so every process reads the same value after the same batch and the decision comes one step after the
signal. Reading it at once (``.item()``), or going through ``strategy.reduce`` (a barrier, then the all-reduce),
would wait every step until the GPU had run everything queued: the host could not queue the next step while the GPU
computes this one.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from dora_lightning.host_copy import HostCopy, queue_to_host

__all__ = ["StopAgreement"]


class StopAgreement:
    """The stop requests of all processes, all-reduced (max) after each batch and read one batch later."""

    def __init__(self) -> None:
        self._pending: HostCopy | None = None

    def reset(self) -> None:
        """Forget a queued exchange (a new fit starts)."""
        self._pending = None

    def exchange(self, request: int, strategy: Any) -> int:
        """Queue this batch's ``request`` and return the agreed (largest) request of the previous batch: 0 after a
        fit's first batch. Every process must call it after every batch."""
        agreed = 0 if self._pending is None else int(self._pending.wait()[0])
        flag = torch.full((1,), request, dtype=torch.int32, device=strategy.root_device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # queued in the stream: no barrier, no wait
        else:  # a strategy without torch.distributed: its own (waiting) reduction
            flag = strategy.reduce(flag, reduce_op="max")
        self._pending = queue_to_host(flag)
        return agreed
