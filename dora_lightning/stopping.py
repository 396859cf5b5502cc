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
  all-reduce of a flag, read a batch later: :class:`~dora_lightning.stop_agreement.StopAgreement`, which never makes
  the host wait for the GPU) and all stop after the same step, one step after the signal. Lightning's own SIGTERM
  handler, replaced while the loop runs, broadcasts from inside the handler, which can meet another process's
  gradient all-reduce: 2-process CPU runs sent SIGTERM hung or aborted (SIGABRT) in 2 of 3 trials with it. Its
  per-step broadcast (a device value read back before every batch, fed only by that handler) is off meanwhile.
* SLURM's requeue signal (``#SBATCH --signal=USR1@90`` with Lightning's SLURM auto-requeue, on by default under
  SLURM): the same stop and checkpoint, then process 0 requeues the job (``scontrol requeue``), whose script continues
  with ``--ckpt_path last``. Lightning's own requeue handler, replaced while the loop runs, saves ``hpc_ckpt_N.ckpt``
  from inside the signal handler, wherever the step is (between the optimiser step and the EMA update, or in a
  collective of a multi-process run).
* Data-loader workers ignore these signals (:func:`dora_lightning.data.loader.shield_worker_from_stop_signals`): a
  signal sent to the whole process group (a terminal's Ctrl-C, SLURM, ``pkill``) would otherwise kill them and end
  the run with a loader error before anything is saved.

Only the newest ``stopped-step=*.ckpt`` of a folder is kept. ``save: false`` stops after the step without saving,
with the exit statuses above.

``trainer.max_time`` is the time budget of each invocation (a machine rented by the day: ``--trainer.max_time
00:23:30:00`` and the same command every day): a resumed run gets the whole budget again. Lightning's ``Timer`` would
restore the time the checkpoint's run had spent, and a run stopped by ``max_time`` then resumed with the advised
command stopped at once, training nothing.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import lightning.pytorch as pl
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import Callback, Timer
from lightning.pytorch.utilities.exceptions import SIGTERMException

from dora_lightning.run_plan import format_duration
from dora_lightning.runs import trainer_checkpoint_folder
from dora_lightning.stop_agreement import StopAgreement

__all__ = ["STOPPED_PREFIX", "StopCheckpoint"]

STOPPED_PREFIX = "stopped-step="
# in the order of precedence when processes got different ones (SLURM's requeue signal, when on, comes last: it wins)
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# Lightning's training epoch loop method that broadcasts its SIGTERM flag from process 0 before every batch
LIGHTNING_BROADCAST = "_broadcast_sigterm_tensor"


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
        self._agreed: int | None = None  # the signal all processes act on
        self._requeue_signal: int | None = None  # SLURM's, when Lightning's auto-requeue is on
        self._previous: dict[int, Any] = {}
        self._last_step = 0
        self._agreement = StopAgreement()  # multi-process runs
        self._quieted: Any = None  # the epoch loop whose per-step SIGTERM broadcast is off
        # a stop decided at a batch's end, taken at the next batch's start or at the run's end
        self._stop_pending = False

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """``trainer.max_time`` counts this invocation only: the ``Timer``'s state in the resumed checkpoint (the
        time its run had spent) is dropped before Lightning restores the callbacks' states (all callbacks'
        ``on_load_checkpoint`` come first), so the ``Timer`` starts from zero."""
        states = checkpoint.get("callbacks")
        if not isinstance(states, dict):
            return
        for callback in trainer.callbacks:
            if isinstance(callback, Timer):
                states.pop(callback.state_key, None)
                states.pop(callback._legacy_state_key, None)

    # ------------------------------------------------------------------------------------------------ signals
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Take SIGTERM, Ctrl-C and SLURM's requeue signal over for the training loop (Lightning's handlers are back
        after it)."""
        self._trainer, self._received, self._agreed, self._stop_pending = trainer, None, None, False
        self._last_step = trainer.global_step
        self._requeue_signal = _slurm_requeue_signal(trainer)
        self._agreement.reset()
        if threading.current_thread() is not threading.main_thread():
            return  # Python delivers signals to the main thread only (and refuses handlers from others)
        for signum in self._signals():
            self._previous.setdefault(signum, signal.signal(signum, self._on_signal))
        if trainer.world_size > 1:
            self._quiet_lightning_broadcast(trainer)

    def _quiet_lightning_broadcast(self, trainer: pl.Trainer) -> None:
        """Turn Lightning's per-step SIGTERM broadcast (Lightning >= 2.5, multi-process runs) off for this fit: it
        reads a device tensor back every step, and only Lightning's SIGTERM handler, replaced here, feeds it."""
        loop = trainer.fit_loop.epoch_loop
        if hasattr(loop, LIGHTNING_BROADCAST):
            setattr(loop, LIGHTNING_BROADCAST, _no_broadcast)  # shadows the method on this loop alone
            self._quieted = loop

    def _release(self) -> None:
        """Give the signals back to their previous handlers and Lightning its broadcast (the end of a fit)."""
        self._restore_handlers()
        if self._quieted is not None:
            vars(self._quieted).pop(LIGHTNING_BROADCAST, None)
            self._quieted = None

    def _signals(self) -> tuple[int, ...]:
        """The signals this callback acts on, by precedence (the requeue signal last: it wins)."""
        return _STOP_SIGNALS + ((self._requeue_signal,) if self._requeue_signal is not None else ())

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
        """Decide to stop after a batch whose optimiser step ran (not inside gradient accumulation) when any process
        was asked to: every process takes the same decision, on the same signal, at the same batch (in a
        multi-process run one all-reduce of the signal's precedence per batch, acted on a batch later; none in a
        single-process one)."""
        signals = self._signals()
        received = self._received
        if received is None and trainer.received_sigterm:  # Lightning's handler, before this fit's loop began
            received = signal.SIGTERM
        request = 0 if received is None else 1 + signals.index(received)
        if trainer.world_size > 1:
            request = self._agreement.exchange(request, trainer.strategy)
        stepped, self._last_step = trainer.global_step != self._last_step, trainer.global_step
        if request and stepped:
            # taken once Lightning has finished this step (its metrics logged, its counters complete): at the next
            # batch's start, or at the run's end. Raised here, the step's metrics were never logged
            self._agreed, self._stop_pending = signals[request - 1], True
            if trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
                # the epoch's last step: its end comes first (its checkpoints; eval_during stands aside), then the
                # run ends (on_train_end), the next epoch unstarted. Stopped here, the epoch's checkpoint was never
                # written, and a resumed run counted its epochs one short, so its later checkpoints resumed other clips
                trainer.should_stop = True

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """The stop decided at the previous batch's end (:meth:`on_train_batch_end`)."""
        if self._stop_pending:
            self._stop_pending = False
            raise SIGTERMException

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Release the signals; a run that a limit or a callback ended before its planned steps says so in one line
        (Lightning's own line then names the epoch limit, even after a ``max_time`` stop inside the last epoch)."""
        self._release()
        if self._stop_pending:  # decided on the run's last step, or on an epoch's last
            self._stop_pending = False
            raise SIGTERMException
        planned = getattr(pl_module, "total_steps", None)
        if not isinstance(planned, int) or trainer.global_step >= planned or trainer.global_step == 0:
            return
        timer = next((c for c in trainer.callbacks if isinstance(c, Timer)), None)
        remaining = None if timer is None else timer.time_remaining()
        by_time = timer is not None and remaining is not None and remaining <= 0
        cause = "trainer.max_time" if by_time else "trainer.should_stop"
        if by_time:
            cause += f" ({format_duration(timer.time_elapsed())} in this invocation)"
        folder = trainer_checkpoint_folder(trainer)
        then = "; continue with the same command and --ckpt_path last" if folder is not None else ""
        if then and by_time:
            then += " (trainer.max_time counts each invocation from its start)"
        self._say(f"stopped by {cause} after step {trainer.global_step} of the {planned} planned{then}")

    # ------------------------------------------------------------------------------------------------ the stop
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        """After the loop stopped at a step's end (:class:`SIGTERMException`, ours or Lightning's): save, say it, and
        set the exit status (``SystemExit.code``): 128 + the signal's number for process 0, 0 for the others
        (Lightning's launcher ends every process of the run as soon as one of its children exits non-zero)."""
        self._release()
        if not isinstance(exception, SIGTERMException):
            return
        # no agreed signal: Lightning's SIGTERM handling before the loop started
        received = self._agreed or self._received or signal.SIGTERM
        exception.code = 128 + received if trainer.is_global_zero else 0
        requeue = received == self._requeue_signal
        what = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}.get(received) or (
            f"{signal.Signals(received).name} (SLURM's requeue signal)"
        )
        stopped = f"stopped by {what} after step {trainer.global_step}"
        then = "continue with the same command and --ckpt_path last"
        wrote = False
        if not self.save:
            saved = "nothing saved (--on_stop.save false)"
        elif (folder := trainer_checkpoint_folder(trainer)) is None:
            saved = "nothing saved: checkpointing is off"
        else:
            path = folder / f"{STOPPED_PREFIX}{trainer.global_step}.ckpt"
            try:
                trainer.save_checkpoint(path, weights_only=False)
            except KeyboardInterrupt:
                # a second Ctrl-C while saving (the handlers are given back first): stopped at once, as promised
                self._say(f"{stopped}; Ctrl-C again while saving: stopped at once, nothing saved")
                raise SystemExit(1) from None
            if trainer.is_global_zero:
                _remove_older_stops(folder, keep=path)
            self.saved, saved, wrote = path, f"saved {path}", True
        if requeue and trainer.is_global_zero:
            then = _requeue()
        self._say(f"{stopped}; {saved}; {then}" if wrote or requeue else f"{stopped}; {saved}")

    def _say(self, message: str) -> None:
        if self._trainer is None or self._trainer.is_global_zero:
            sys.stderr.write(f"dora fit: {message}\n")
            sys.stderr.flush()


def _no_broadcast() -> None:
    """Stands in for Lightning's per-step SIGTERM broadcast while :class:`StopCheckpoint` agrees on stops."""


def _slurm_requeue_signal(trainer: pl.Trainer) -> int | None:
    """SLURM's requeue signal when the run's cluster environment is SLURM with auto-requeue on (Lightning's default
    under SLURM; ``--trainer.plugins SLURMEnvironment --trainer.plugins.auto_requeue false`` turns it off)."""
    connector = getattr(trainer, "_accelerator_connector", None)
    environment = getattr(connector, "cluster_environment", None)
    if isinstance(environment, SLURMEnvironment) and environment.auto_requeue:
        return int(environment.requeue_signal or signal.SIGUSR1)
    return None


def _slurm_job_id() -> str | None:
    """This SLURM job's id for ``scontrol`` (``ARRAYJOB_TASK`` for a job array's task), or None outside SLURM."""
    array_job, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    job = f"{array_job}_{task}" if array_job and task else os.environ.get("SLURM_JOB_ID")
    return job if job and re.fullmatch(r"[0-9_]+", job) else None


def _requeue() -> str:
    """Requeue this SLURM job (``scontrol requeue``); what happened, in words for the stop's line."""
    job = _slurm_job_id()
    if job is None:
        return "not requeued: no SLURM_JOB_ID; resubmit the job with --ckpt_path last"
    try:
        done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        problem = str(err)
    else:
        if done.returncode == 0:
            return f"requeued SLURM job {job}: its script continues the run with --ckpt_path last"
        problem = (done.stderr or done.stdout).strip() or f"exit status {done.returncode}"
    return f"`scontrol requeue {job}` failed ({problem}); resubmit the job with --ckpt_path last"


def _remove_older_stops(folder: Path, keep: Path) -> None:
    """Delete the ``stopped-step=*.ckpt`` files of ``folder`` other than ``keep``: only the newest stop is kept."""
    for path in folder.glob(f"{STOPPED_PREFIX}*.ckpt"):
        if path.name != keep.name:
            path.unlink(missing_ok=True)
