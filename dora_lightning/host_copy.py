"""Device values brought to the host without making the host wait for the device.

Reading a GPU tensor (``float(t)``, ``t.item()``, ``t.cpu()``) waits until the GPU has run everything queued before
it: the host can no longer queue the next work while the GPU computes, and the GPU idles at every such read.
:func:`queue_to_host` instead queues a copy into pinned host memory with an event behind it; the copy is read once
the event has completed (:meth:`HostCopy.arrived`), or waited for then (:meth:`HostCopy.wait`), typically a step
later, when the GPU has long finished that work. On the CPU the value is there at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["HostCopy", "queue_to_host"]


@dataclass(frozen=True)
class HostCopy:
    """A host tensor that holds a device tensor's values once ``event`` (None: at once) has completed."""

    values: Tensor
    event: torch.cuda.Event | None = None

    def arrived(self) -> bool:
        """Whether the values are on the host (never waits)."""
        return self.event is None or self.event.query()

    def wait(self) -> Tensor:
        """The host values, waiting for the copy (only the work queued before it) if it has not arrived."""
        if self.event is not None:
            self.event.synchronize()
        return self.values


def queue_to_host(tensor: Tensor) -> HostCopy:
    """Queue a copy of ``tensor`` (detached) to the host: on CUDA into pinned memory behind an event, never waiting;
    on the CPU the tensor itself; on other accelerators a plain (waiting) copy."""
    tensor = tensor.detach()
    if tensor.device.type == "cuda":
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        host.copy_(tensor, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return HostCopy(host, event)
    return HostCopy(tensor if tensor.device.type == "cpu" else tensor.cpu())
