"""Watching the copies between devices that code makes (tests of "never waits for the device")."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["CopyWatch"]


class CopyWatch(TorchDispatchMode):
    """Records every copy between devices: (source device, target device, non_blocking)."""

    def __init__(self) -> None:
        super().__init__()
        self.copies: list[tuple[str, str, bool]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if (
            func is torch.ops.aten._to_copy.default
            and "device" in kwargs
            and kwargs["device"] != args[0].device
        ):
            self.copies.append((args[0].device.type, kwargs["device"].type, bool(kwargs.get("non_blocking"))))
        elif func is torch.ops.aten.copy_.default and args[0].device != args[1].device:
            self.copies.append(
                (args[1].device.type, args[0].device.type, bool(args[2] if len(args) > 2 else False))
            )
        return func(*args, **kwargs)
