"""Callbacks for `dora fit` subprocesses in tests: signal the process group after a step, mark a step, log the collectives."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from lightning.pytorch.callbacks import Callback


class SignalGroupAt(Callback):
    """After optimiser step ``step``, send ``signum`` to this process's group (the run and its loader workers), as a
    terminal's Ctrl-C, SLURM or ``pkill`` do."""

    def __init__(self, step: int, signum: int) -> None:
        self.step, self.signum = step, signum

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.killpg(os.getpgid(0), self.signum)


class TouchAt(Callback):
    """After optimiser step ``step``, process 0 creates the file ``path``: a test waiting for it then signals the run
    from outside, at a moment the run does not choose (inside a step, a collective, a data wait)."""

    def __init__(self, step: int, path: str) -> None:
        self.step, self.path = step, path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step and trainer.is_global_zero:
            open(self.path, "w").close()


class CollectiveLog(Callback):
    """Records this process's Python-level broadcasts, all-reduces and barriers from the first batch on (which
    group, which device, called from which file; not the start's one-time checks, e.g. that every process resumed at
    the same step) and the batches trained, in ``<path>.<rank>.json`` after every batch: what the stop agreement
    costs each step."""

    def __init__(self, path: str) -> None:
        self.path, self.calls, self.batches, self.recording = path, [], 0, False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.recording = True

    def on_train_start(self, trainer, pl_module) -> None:
        import torch.distributed as dist

        def record(name, tensor, group):
            if not self.recording:
                return
            self.calls.append(
                {
                    "op": name,
                    "device": None if tensor is None else tensor.device.type,
                    "world": group is None or group is dist.group.WORLD,
                    "caller": Path(sys._getframe(2).f_code.co_filename).name,
                }
            )

        def logged(name, original):
            def call(tensor, *args, group=None, **kwargs):
                record(name, tensor, group)
                return original(tensor, *args, group=group, **kwargs)

            return call

        def logged_barrier(original):
            def call(*args, group=None, **kwargs):
                record("barrier", None, group)
                return original(*args, group=group, **kwargs)

            return call

        for name in ("broadcast", "all_reduce"):
            setattr(dist, name, logged(name, getattr(dist, name)))
        dist.barrier = logged_barrier(dist.barrier)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        import json

        self.batches += 1
        with open(f"{self.path}.{trainer.global_rank}.json", "w") as out:
            json.dump({"batches": self.batches, "calls": self.calls}, out)
