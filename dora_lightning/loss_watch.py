"""Reads each step's loss back to the host without making the host wait for the device.

``float(loss)`` or ``bool(torch.isfinite(loss))`` on a GPU tensor waits until the GPU has run everything queued
before it: the host can no longer queue the backward pass and the optimiser step while the forward runs, and the GPU
idles at every step. :class:`LossWatch` instead queues a copy of (loss, finite) into pinned host memory with an event
behind it (:func:`~dora_lightning.host_copy.queue_to_host`) and reads it once the event has completed (usually at
the next step, without waiting). On the CPU the values are there at once, so a non-finite loss is reported in the
step that produced it.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch
from torch import Tensor

from dora_lightning.host_copy import HostCopy, queue_to_host

__all__ = ["LossReading", "LossWatch"]


@dataclass(frozen=True)
class LossReading:
    """One step's loss on the host: ``loss`` a 0-d CPU tensor (logging it never touches the device), ``value`` the
    same number, ``finite`` whether it is finite."""

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

    def __init__(self) -> None:
        self._pending: deque[tuple[int, int, HostCopy]] = deque()

    def push(self, step: int, epoch: int, loss: Tensor) -> None:
        """Queue ``loss`` (a 0-d tensor, any device) of optimiser step ``step``; never waits for the device."""
        loss = loss.detach()
        values = torch.stack([loss.float(), torch.isfinite(loss).float()])
        self._pending.append((step, epoch, queue_to_host(values)))

    def ready(self, wait: bool = False) -> list[LossReading]:
        """The queued losses that have reached the host, oldest first (all of them, waiting if needed, if ``wait``)."""
        out: list[LossReading] = []
        while self._pending:
            step, epoch, copy = self._pending[0]
            if not (wait or copy.arrived()):
                break
            self._pending.popleft()
            out.append(LossReading.of(step, epoch, copy.wait()))
        return out

    def clear(self) -> None:
        """Forget what is queued (a new fit starts)."""
        self._pending.clear()
