"""Process-group hygiene and agreement for multi-process runs.

:func:`process_zero_value_if_any_differs` asks whether every process holds the same value (the videos each found, the
step each resumed at) and gives every process the same answer, so that all stop together: a process that stopped
alone would leave the others waiting in their next collective (on GPUs until NCCL's timeout).

Lightning destroys the ``torch.distributed`` process group at exit only for NCCL. With gloo (CPU DDP) a finished
all-reduce can still be held by gloo's worker thread when Python finalises; that thread then needs the GIL to free
the tensors, is stopped by the interpreter instead and the process aborts with ``terminate called without an active
exception`` after the run succeeded. Destroying the group in an ``atexit`` handler joins those threads while the
interpreter is still whole.

:class:`PatientVote` is a yes/no vote of all processes that waits as long as the run says, not as long as the training's
process group allows: the other processes wait in it while process 0 alone evaluates (``eval_during``).
"""

from __future__ import annotations

import atexit
import sys
from datetime import timedelta
from typing import Any

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


def process_zero_value_if_any_differs(strategy: Any, value: Any) -> Any | None:
    """Process 0's ``value`` on every process when any process's ``value`` differs from it; None when all agree (or
    there is one process). ``strategy`` is the Trainer's (``world_size``, ``broadcast``, ``reduce_boolean_decision``:
    Lightning's collectives, on the device NCCL needs); ``value`` is picklable and compared with ``==``."""
    if getattr(strategy, "world_size", 1) <= 1:
        return None
    reference = strategy.broadcast(value, src=0)
    differs = strategy.reduce_boolean_decision(value != reference, all=False)
    return reference if differs else None


class PatientVote:
    """ "Did any process say yes?", asked of all processes over a gloo group of their own whose timeout is
    ``patience``: a process may wait in it for hours while another works alone (process 0's evaluation), where a
    collective of the training's group ends the run after that group's timeout (Lightning's default: 30 minutes,
    NCCL's watchdog then aborts the waiting processes). Every process builds it at the same point (it is a
    collective); with one process, or without ``torch.distributed``, the vote is the process's own answer."""

    def __init__(self, world_size: int, patience: timedelta) -> None:
        import torch.distributed as dist

        self._group = None
        if world_size > 1 and dist.is_available() and dist.is_initialized():
            self._group = dist.new_group(backend="gloo", timeout=patience)

    def any(self, yes: bool) -> bool:
        """True on every process when any process's ``yes`` is true; waits for all, up to ``patience``."""
        if self._group is None:
            return yes
        import torch
        import torch.distributed as dist

        vote = torch.tensor([int(yes)])
        dist.all_reduce(vote, op=dist.ReduceOp.MAX, group=self._group)
        return bool(vote.item())

    def close(self) -> None:
        """Free the group (every process, at the same point); a closed vote is each process's own answer."""
        import torch.distributed as dist

        if self._group is not None and dist.is_initialized():
            dist.destroy_process_group(self._group)
        self._group = None
