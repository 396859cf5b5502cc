"""Process-group hygiene for multi-process runs.

Lightning destroys the ``torch.distributed`` process group at exit only for NCCL. With gloo (CPU DDP) a finished
all-reduce can still be held by gloo's worker thread when Python finalises; that thread then needs the GIL to free
the tensors, is stopped by the interpreter instead and the process aborts with ``terminate called without an active
exception`` after the run succeeded. Destroying the group in an ``atexit`` handler joins those threads while the
interpreter is still whole.
"""

from __future__ import annotations

import atexit
import sys

_registered = False


def destroy_process_group_if_initialized() -> None:
    """Destroy the default process group when one exists (any backend); a no-op otherwise, also when torch was never
    imported (the hook itself imports nothing)."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def destroy_process_group_at_exit() -> None:
    """Register :func:`destroy_process_group_if_initialized` to run at interpreter exit (once per process)."""
    global _registered
    if not _registered:
        atexit.register(destroy_process_group_if_initialized)
        _registered = True
