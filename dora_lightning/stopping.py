"""StopCheckpoint: a run stopped by SIGTERM or Ctrl-C finishes its step, saves where it stands and exits.

Rented and shared GPUs stop jobs with SIGTERM: spot or preemptible instances (30 s to 2 min of notice), SLURM at a
time limit or ``scancel``, ``docker stop``, Kubernetes, a user's ``kill``. Lightning alone ends the run after the
step that is running, without a checkpoint, so everything since the last rolling checkpoint (up to 500 steps in
``configs/wt.yaml``) is lost, and the process exits with status 0, as if it had finished. With this callback (on in
``dora fit``, options ``--on_stop.*``):

* SIGTERM: the step that is running finishes (Lightning stops the loop at the step's end, on every process at the
  same step), then ``stopped-step=S.ckpt`` is written in the run's checkpoint folder (the newest checkpoint, so
  ``--ckpt_path last`` continues from it, exactly: weights, optimiser, data position and RNG states), and the
  process exits with status 143 (128 + SIGTERM), saying so in one line.
* Ctrl-C: the same, exit status 130; a second Ctrl-C stops at once, without a checkpoint (Lightning's own stop).
* Data-loader workers ignore both signals (:func:`dora_lightning.data.loader.shield_worker_from_stop_signals`): a
  signal sent to the whole process group (a terminal's Ctrl-C, SLURM, ``pkill``) would otherwise kill them and end
  the run with a loader error before anything is saved.

Only the newest ``stopped-step=*.ckpt`` of a folder is kept. ``save: false`` keeps Lightning's behaviour (stop
after the step, nothing saved) with the exit statuses above.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from types import FrameType
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import SIGTERMException

__all__ = ["STOPPED_PREFIX", "StopCheckpoint"]

STOPPED_PREFIX = "stopped-step="
_EXIT_STATUS = {signal.SIGTERM: 128 + signal.SIGTERM, signal.SIGINT: 128 + signal.SIGINT}


class StopCheckpoint(Callback):
    """On SIGTERM or a first Ctrl-C, end the run after the running step with a resumable checkpoint.

    Args:
        save: write ``stopped-step=S.ckpt`` in the run's checkpoint folder before exiting (``False``: stop after the
            step without saving, as Lightning does).
    """

    def __init__(self, save: bool = True) -> None:
        self.save = save
        self.saved: Path | None = None
        self._trainer: pl.Trainer | None = None
        self._ctrl_c = False
        self._previous_sigint: Any = None
        self._first_step = 0

    # ------------------------------------------------------------------------------------------------ signals
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._trainer, self._ctrl_c, self._first_step = trainer, False, trainer.global_step
        if self._previous_sigint is None:
            self._previous_sigint = signal.signal(signal.SIGINT, self._on_ctrl_c)

    def _on_ctrl_c(self, signum: int, frame: FrameType | None) -> None:
        """First Ctrl-C: stop as on SIGTERM (Lightning's handler, which also stops the other processes of a
        multi-process run at the same step). Second: Lightning's immediate stop (KeyboardInterrupt)."""
        terminate = signal.getsignal(signal.SIGTERM)
        if self._ctrl_c or not callable(terminate):
            self._restore_sigint()
            raise KeyboardInterrupt
        self._ctrl_c = True
        self._say(
            "Ctrl-C: finishing this step, then saving a checkpoint and stopping (Ctrl-C again stops at once, unsaved)"
        )
        terminate(signal.SIGTERM, frame)

    def _restore_sigint(self) -> None:
        if self._previous_sigint is not None:
            signal.signal(signal.SIGINT, self._previous_sigint)
            self._previous_sigint = None

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._restore_sigint()

    # ------------------------------------------------------------------------------------------------ the stop
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        """After Lightning stopped the loop at a step's end (:class:`SIGTERMException`): save, say it, and set the
        exit status (``SystemExit.code``) to 128 + the signal's number."""
        if not isinstance(exception, SIGTERMException):
            return
        received = signal.SIGINT if self._ctrl_c else signal.SIGTERM
        exception.code = _EXIT_STATUS[received]
        what = "Ctrl-C" if self._ctrl_c else "SIGTERM"
        step = trainer.global_step
        if not self.save:
            self._say(f"stopped by {what} after step {step}; nothing saved (--on_stop.save false)")
            return
        if step == self._first_step:
            self._say(f"stopped by {what} before this run's first step; nothing new to save")
            return
        folder = _checkpoint_folder(trainer)
        if folder is None:
            self._say(f"stopped by {what} after step {step}; nothing saved: checkpointing is off")
            return
        path = folder / f"{STOPPED_PREFIX}{step}.ckpt"
        trainer.save_checkpoint(path, weights_only=False)
        if trainer.is_global_zero:
            _remove_older_stops(folder, keep=path)
        self.saved = path
        self._say(
            f"stopped by {what} after step {step}; saved {path}; continue with the same command and --ckpt_path last"
        )

    def _say(self, message: str) -> None:
        if self._trainer is None or self._trainer.is_global_zero:
            sys.stderr.write(f"dora fit: {message}\n")
            sys.stderr.flush()


def _checkpoint_folder(trainer: pl.Trainer) -> Path | None:
    """The folder of the run's first checkpoint callback (where ``--ckpt_path last`` looks), or None without one."""
    for callback in trainer.checkpoint_callbacks:
        dirpath = getattr(callback, "dirpath", None)
        if dirpath:
            return Path(dirpath)
    return None


def _remove_older_stops(folder: Path, keep: Path) -> None:
    """Delete the ``stopped-step=*.ckpt`` files of ``folder`` other than ``keep``: only the newest stop is kept."""
    for path in folder.glob(f"{STOPPED_PREFIX}*.ckpt"):
        if path.name != keep.name:
            path.unlink(missing_ok=True)
