"""EndLaunchedProcesses: when process 0 of a run started by Lightning's own launcher fails, the processes it launched
end with it instead of waiting for it.

``dora fit --trainer.devices N`` on one node starts processes 1..N-1 from process 0 (Lightning's
``_SubprocessScriptLauncher``). Lightning ends them when one of *them* fails, or on Ctrl-C, but not when process 0
fails alone: a full disk when process 0 writes a checkpoint (the others are at the barrier after the save), an
error in anything process 0 does by itself. Process 0 then exits and the others wait in their next collective: with
NCCL until the process group's timeout (Lightning's default: 30 minutes), holding their GPUs; anything that blocks
them without a collective, for ever. ``torchrun`` and ``srun --kill-on-bad-exit=1`` end them themselves (their
processes are not process 0's children, and this callback leaves them alone).
"""

from __future__ import annotations

import subprocess
import sys
import time

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher

__all__ = ["EndLaunchedProcesses"]


class EndLaunchedProcesses(Callback):
    """On an exception in process 0: give the processes it launched ``grace_s`` seconds to end by themselves (a
    failure all processes agreed on ends them all, each saying why), then kill those still running, saying how many.

    Args:
        grace_s: how long process 0 waits for the processes it launched before it kills them.
    """

    def __init__(self, grace_s: float = 30.0) -> None:
        self.grace_s = grace_s

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        launcher = trainer.strategy.launcher
        if not isinstance(launcher, _SubprocessScriptLauncher) or isinstance(exception, KeyboardInterrupt):
            return  # not Lightning's launcher, or Ctrl-C: Lightning kills the processes itself
        waiting = end_processes(launcher.procs, self.grace_s)
        if waiting:
            sys.stderr.write(
                f"dora fit: process 0 failed; ended {waiting} process(es) it had launched that were still running "
                f"{self.grace_s:g} s later (waiting for it)\n"
            )


def end_processes(processes: list[subprocess.Popen], grace_s: float) -> int:
    """Wait up to ``grace_s`` seconds in all for ``processes`` to exit, kill (SIGKILL) those still running and reap
    them; return how many were killed."""
    deadline = time.monotonic() + grace_s
    for process in processes:
        try:
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    running = [process for process in processes if process.poll() is None]
    for process in running:
        process.kill()
    for process in running:
        process.wait()
    return len(running)
