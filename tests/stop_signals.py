"""A callback for `dora fit` subprocesses in tests: signal the whole process group after a given step."""

from __future__ import annotations

import os

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
