"""Reads each step's loss back to the host without making the host wait for the device.

``float(loss)`` or ``bool(torch.isfinite(loss))`` on a GPU tensor waits until the GPU has run everything queued
before it: the host can no longer queue the backward pass and the optimiser step while the forward runs, and the GPU
idles at every step. :class:`LossWatch` instead queues a copy of (loss, finite) into pinned host memory with an event
behind it and reads it once the event has completed (usually at the next step, without waiting). On the CPU the
values are there at once, so a non-finite loss is reported in the step that produced it.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch
from torch import Tensor

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
        self._pending: deque[tuple[int, int, Tensor, torch.cuda.Event | None]] = deque()

    def push(self, step: int, epoch: int, loss: Tensor) -> None:
        """Queue ``loss`` (a 0-d tensor, any device) of optimiser step ``step``; never waits for the device."""
        loss = loss.detach()
        values = torch.stack([loss.float(), torch.isfinite(loss).float()])
        event = None
        if values.device.type == "cuda":
            host = torch.empty(2, dtype=torch.float32, pin_memory=True)
            host.copy_(values, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            values = host
        elif values.device.type != "cpu":
            values = values.cpu()  # other accelerators: a plain (waiting) copy
        self._pending.append((step, epoch, values, event))

    def ready(self, wait: bool = False) -> list[LossReading]:
        """The queued losses that have reached the host, oldest first (all of them, waiting if needed, if ``wait``)."""
        out: list[LossReading] = []
        while self._pending:
            step, epoch, values, event = self._pending[0]
            if event is not None and not event.query():
                if not wait:
                    break
                event.synchronize()
            self._pending.popleft()
            out.append(LossReading.of(step, epoch, values))
        return out

    def clear(self) -> None:
        """Forget what is queued (a new fit starts)."""
        self._pending.clear()
