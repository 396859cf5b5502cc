"""EndLaunchedProcesses: when process 0 of a run started by Lightning's own launcher fails, the processes it launched
end with it instead of waiting for it.

``dora fit --trainer.devices N`` on one node starts processes 1..N-1 from process 0 (Lightning's
``_SubprocessScriptLauncher``). Lightning ends them when one of *them* fails, or on Ctrl-C, but not when process 0
fails alone: a full disk when process 0 writes a checkpoint (the others are at the barrier after the save), an
error in anything process 0 does by itself. Process 0 then exits and the others wait in their next collective: with
NCCL until the process group's timeout (Lightning's default: 30 minutes), holding their GPUs; anything that blocks
them without a collective, for ever. With this callback process 0 kills them when it exits. ``torchrun`` and
``srun --kill-on-bad-exit=1`` end them themselves (their processes are not process 0's children, and this callback
leaves them alone).
"""

from __future__ import annotations

import atexit
import subprocess
import sys
import threading

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher
from lightning.pytorch.utilities.exceptions import SIGTERMException

__all__ = ["EndLaunchedProcesses"]

_OBSERVER_THREAD = (
    "child-process-observer"  # the name of Lightning's thread that watches the launched processes
)


class EndLaunchedProcesses(Callback):
    """On an exception in process 0: when process 0 exits (after its one-line error), the processes it launched
    that are still running are killed, and how many is said. Not before: Lightning's own observer kills process 0
    (SIGKILL) a few seconds after a launched process exits with an error, as the others do when they stop together
    with process 0 (a NaN loss, a failed evaluation), so process 0 must not wait for them."""

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        launcher = trainer.strategy.launcher
        if not isinstance(launcher, _SubprocessScriptLauncher) or isinstance(exception, KeyboardInterrupt):
            return  # not Lightning's launcher, or Ctrl-C: Lightning kills the processes itself
        if isinstance(exception, SIGTERMException):
            return  # a stop (SIGTERM, Ctrl-C, a requeue): every process saves and exits by itself, with its status
        atexit.register(_end_at_exit, list(launcher.procs))


def _end_at_exit(processes: list[subprocess.Popen]) -> None:
    # Lightning's observer thread would take the processes killed here for failed ones and kill process 0 too
    # (SIGKILL: its exit status lost); it is told to watch none
    for thread in threading.enumerate():
        if thread.name == _OBSERVER_THREAD and hasattr(thread, "_child_processes"):
            thread._child_processes = []
    ended = end_processes(processes)
    if ended:
        sys.stderr.write(
            f"dora fit: process 0 failed; ended {ended} process(es) it had launched that were still running "
            "(waiting for it)\n"
        )


def end_processes(processes: list[subprocess.Popen]) -> int:
    """Kill (SIGKILL) those of ``processes`` still running and reap them; return how many were killed."""
    running = [process for process in processes if process.poll() is None]
    for process in running:
        process.kill()
    for process in running:
        process.wait()
    return len(running)
