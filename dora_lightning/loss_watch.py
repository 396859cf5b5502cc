"""Reads each step's loss back to the host without making the host wait for the device.

``float(loss)`` or ``bool(torch.isfinite(loss))`` on a GPU tensor waits until the GPU has run everything queued
before it: the host can no longer queue the backward pass and the optimiser step while the forward runs, and the GPU
idles at every step. :class:`LossWatch` instead queues a copy of (loss, finite) into pinned host memory with an event
behind it (:func:`~dora_lightning.host_copy.queue_to_host`) and reads it once the event has completed (usually at
the next step, without waiting). On the CPU the values are there at once, so a non-finite loss is reported in the
step that produced it.

In a run of several processes each process's loss is its own, and a loss copy reaches each host at its own time:
a process that stopped on a non-finite loss as soon as its copy arrived would leave the others in the next
collective (a hang until the process group's timeout). There the watch is built with ``across_processes=True``:
the finiteness is all-reduced (min) over the process group in the stream, and :meth:`LossWatch.ready` waits
for every loss but the one just pushed, so all processes see the same non-finite step at the same batch and
stop together.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from dora_lightning.host_copy import HostCopy, queue_to_host

__all__ = ["LossReading", "LossWatch"]


@dataclass(frozen=True)
class LossReading:
    """One step's loss on the host: ``loss`` a 0-d CPU tensor (logging it never touches the device), ``value`` the
    same number, ``finite`` whether it is finite (in a watch across processes: whether every process's loss is)."""

    step: int
    epoch: int
    loss: Tensor
    value: float
    finite: bool

    @classmethod
    def of(cls, step: int, epoch: int, host: Tensor) -> LossReading:
        """From the host copy ``host`` = (loss, 1.0 if finite else 0.0), read without an aten op (tolist)."""
        value, finite = host.tolist()
        return cls(step, epoch, host[0], value, finite > 0)


class LossWatch:
    """Queues each step's loss for the host (:meth:`push`) and hands back those that have arrived (:meth:`ready`)."""

    def __init__(self, across_processes: bool = False) -> None:
        self.across_processes = across_processes
        self._pending: deque[tuple[int, int, HostCopy]] = deque()

    def push(self, step: int, epoch: int, loss: Tensor) -> None:
        """Queue ``loss`` (a 0-d tensor, any device) of optimiser step ``step``; never waits for the device. Across
        processes every process must push at the same point of every batch (one all-reduce each)."""
        loss = loss.detach()
        finite = torch.isfinite(loss).float()
        if self.across_processes and dist.is_initialized():
            finite = finite.reshape(1)
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)  # queued in the stream: no barrier, no wait
        values = torch.stack([loss.float(), finite.reshape(())])
        self._pending.append((step, epoch, queue_to_host(values)))

    def ready(self, wait: bool = False) -> list[LossReading]:
        """The queued losses to check now, oldest first: those that have reached the host (across processes: every
        one but the newest, waited for, so that every process reads the same ones after the same batch); all of
        them, waiting if needed, if ``wait``."""
        if self.across_processes and not wait:
            return self._take(len(self._pending) - 1)
        out: list[LossReading] = []
        while self._pending and (wait or self._pending[0][2].arrived()):
            out.extend(self._take(1))
        return out

    def _take(self, count: int) -> list[LossReading]:
        """The ``count`` oldest queued losses, waiting for them if needed."""
        out = []
        for _ in range(max(count, 0)):
            step, epoch, copy = self._pending.popleft()
            out.append(LossReading.of(step, epoch, copy.wait()))
        return out
