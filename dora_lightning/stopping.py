"""StopCheckpoint: a run stopped by SIGTERM or Ctrl-C finishes its step, saves where it stands and exits.

Rented and shared GPUs stop jobs with SIGTERM: spot or preemptible instances (30 s to 2 min of notice), SLURM at a
time limit or ``scancel``, ``docker stop``, Kubernetes, a user's ``kill``. Lightning alone ends the run after the
step that is running, without a checkpoint, so everything since the last rolling checkpoint (up to 500 steps in
``configs/wt.yaml``) is lost, and the process exits with status 0, as if it had finished. With this callback (on in
``dora fit``, options ``--on_stop.*``):

* SIGTERM: the step that is running finishes, then ``stopped-step=S.ckpt`` is written in the run's checkpoint
  folder (the newest checkpoint, so ``--ckpt_path last`` continues from it, exactly: weights, optimiser, data
  position and RNG states), and the process exits with status 143 (128 + SIGTERM), saying so in one line.
* Ctrl-C: the same, exit status 130; a second Ctrl-C stops at once, without a checkpoint (Lightning's own stop).
* Several processes (DDP): the one signal handler only notes the request; after each batch the processes agree (one
  all-reduce of a flag) and all stop after the same step. Lightning's own SIGTERM handler, replaced while the loop
  runs, broadcasts from inside the handler, which can meet another process's gradient all-reduce: 2-process CPU runs
  sent SIGTERM hung or aborted (SIGABRT) in 2 of 3 trials with it.
* Data-loader workers ignore both signals (:func:`dora_lightning.data.loader.shield_worker_from_stop_signals`): a
  signal sent to the whole process group (a terminal's Ctrl-C, SLURM, ``pkill``) would otherwise kill them and end
  the run with a loader error before anything is saved.

Only the newest ``stopped-step=*.ckpt`` of a folder is kept. ``save: false`` stops after the step without saving,
with the exit statuses above.
"""

from __future__ import annotations

import signal
import sys
import threading
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
            step without saving).
    """

    def __init__(self, save: bool = True) -> None:
        self.save = save
        self.saved: Path | None = None
        self._trainer: pl.Trainer | None = None
        self._received: int | None = None  # the first stop signal this process received
        self._previous: dict[int, Any] = {}
        self._last_step = 0

    # ------------------------------------------------------------------------------------------------ signals
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Take SIGTERM and Ctrl-C over for the training loop (Lightning's handlers are back after it)."""
        self._trainer, self._received = trainer, None
        self._last_step = trainer.global_step
        if threading.current_thread() is not threading.main_thread():
            return  # Python delivers signals to the main thread only (and refuses handlers from others)
        for signum in _EXIT_STATUS:
            self._previous.setdefault(signum, signal.signal(signum, self._on_signal))

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        """Note the request (the loop acts on it at the step's end); a second Ctrl-C stops at once, unsaved. Nothing
        else happens here: a collective issued from a signal handler (Lightning's SIGTERM handler broadcasts one)
        can meet another process's gradient all-reduce and hang or abort a multi-process run."""
        if signum == signal.SIGINT and self._received == signal.SIGINT:
            self._restore_handlers()
            raise KeyboardInterrupt
        if self._received is None:
            self._received = signum
            if signum == signal.SIGINT:
                self._say(
                    "Ctrl-C: finishing this step, then saving a checkpoint and stopping "
                    "(Ctrl-C again stops at once, unsaved)"
                )

    def _restore_handlers(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Stop after a batch whose optimiser step ran (not inside gradient accumulation) when any process was asked
        to: every process takes the same decision at the same batch (one all-reduce of a flag per batch in a
        multi-process run, none in a single-process one)."""
        stop = self._received is not None
        if trainer.world_size > 1:
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        stepped, self._last_step = trainer.global_step != self._last_step, trainer.global_step
        if stop and stepped:
            raise SIGTERMException

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore_handlers()

    # ------------------------------------------------------------------------------------------------ the stop
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        """After the loop stopped at a step's end (:class:`SIGTERMException`, ours or Lightning's): save, say it, and
        set the exit status (``SystemExit.code``): 128 + the signal's number for process 0, 0 for the others
        (Lightning's launcher ends every process of the run as soon as one of its children exits non-zero)."""
        self._restore_handlers()
        if not isinstance(exception, SIGTERMException):
            return
        # no signal here: another process's, or Lightning's SIGTERM handling before the loop started
        received = self._received or signal.SIGTERM
        exception.code = _EXIT_STATUS[received] if trainer.is_global_zero else 0
        what = "Ctrl-C" if received == signal.SIGINT else "SIGTERM"
        step = trainer.global_step
        if not self.save:
            self._say(f"stopped by {what} after step {step}; nothing saved (--on_stop.save false)")
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
