"""SIGTERM / Ctrl-C: the run finishes its step, writes stopped-step=S.ckpt, exits 143 / 130, and resumes exactly."""

from __future__ import annotations

import multiprocessing
import os
import re
import signal
import threading
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from test_module import MICRO, make_data, make_trainer
from test_resume import BATCHES, check_resumed, fit, short_video, weights

from dora_lightning.data.loader import shield_worker_from_stop_signals
from dora_lightning.module import DoRAModule
from dora_lightning.stopping import LIGHTNING_BROADCAST, STOPPED_PREFIX, StopCheckpoint

__all__ = ["short_video"]  # the fixture, shared with test_resume


class SignalAt(Callback):
    """Sends ``signals`` to this process after the step ``step`` (or, ``at_epoch_end``, in the epoch's end hook)."""

    def __init__(self, step: int, signals: tuple[int, ...] = (signal.SIGTERM,), at_epoch_end: bool = False):
        self.step, self.signals, self.at_epoch_end = step, signals, at_epoch_end

    def _send(self, trainer: pl.Trainer) -> None:
        if trainer.global_step == self.step:
            for signum in self.signals:
                os.kill(os.getpid(), signum)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self.at_epoch_end:
            self._send(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self.at_epoch_end:
            self._send(trainer)


@pytest.fixture
def keep_sigint():
    """Lightning ignores Ctrl-C after a KeyboardInterrupt (for its shutdown) and never restores it: restore it here."""
    handler = signal.getsignal(signal.SIGINT)
    yield
    signal.signal(signal.SIGINT, handler)


@pytest.fixture(scope="module", params=["max_epochs", "max_steps"])
def straight(request, tmp_path_factory, short_video):
    """An uninterrupted run of EPOCHS x BATCHES steps (limited by epochs or by steps): whether it is limited by
    steps, and the weights and batches a resumed run must reproduce."""
    by_steps = request.param == "max_steps"
    pl.seed_everything(0)
    module, batches = fit(tmp_path_factory.mktemp("straight"), short_video, by_steps=by_steps)
    return by_steps, weights(module), batches


def stop_run(
    root: Path, video: Path, sender: SignalAt, save: bool = True, by_steps: bool = False
) -> tuple[SystemExit, StopCheckpoint]:
    """Train until ``sender`` signals; return the SystemExit that ended ``fit`` and the StopCheckpoint."""
    stopper = StopCheckpoint(save=save)
    saver = ModelCheckpoint(dirpath=root / "checkpoints", every_n_train_steps=1000)
    pl.seed_everything(0)
    with pytest.raises(SystemExit) as stopped:
        fit(root, video, by_steps=by_steps, callbacks=[sender, saver, stopper])
    return stopped.value, stopper


@pytest.mark.parametrize(
    "signal_step, at_epoch_end, step",
    [
        (4, False, 4),  # mid-epoch
        (3, False, 3),  # on an epoch's last step
        (3, True, 4),  # in the epoch's end hooks: after the next epoch's first step
    ],
)
def test_sigterm_saves_a_checkpoint_that_resumes_exactly(
    tmp_path, short_video, straight, signal_step, at_epoch_end, step
):
    by_steps, expected, straight_batches = straight
    sender = SignalAt(signal_step, at_epoch_end=at_epoch_end)
    stopped, stopper = stop_run(tmp_path / "a", short_video, sender, by_steps=by_steps)
    assert stopped.code == 143
    saved = tmp_path / "a" / "checkpoints" / f"{STOPPED_PREFIX}{step}.ckpt"
    assert stopper.saved == saved and saved.is_file()
    pl.seed_everything(123)  # the checkpoint carries the RNG states
    resumed, batches = fit(tmp_path / "b", short_video, by_steps=by_steps, ckpt=saved)
    check_resumed(resumed, batches, expected, straight_batches, step)


def test_a_stop_on_an_epochs_last_step_takes_the_epochs_end_first(tmp_path, short_video, straight):
    """The epoch's own checkpoint is written before the stop, and a run resumed from that stop counts its epochs
    right: stopped again mid-epoch, it resumes exactly. Before, the stop came before the epoch's end (no epoch
    checkpoint), and the resumed run counted its epochs one short: its stop saved epoch 0's position, whose resume
    trained epoch 0's clips again."""
    by_steps, expected, straight_batches = straight
    root = tmp_path / "a"
    first = StopCheckpoint()
    epochs = ModelCheckpoint(
        dirpath=root / "checkpoints", every_n_epochs=1, save_top_k=-1, filename="end-{epoch}"
    )
    pl.seed_everything(0)
    with pytest.raises(SystemExit) as stopped:
        fit(root, short_video, by_steps=by_steps, callbacks=[SignalAt(BATCHES), epochs, first])
    assert (
        stopped.value.code == 143 and first.saved == root / "checkpoints" / f"{STOPPED_PREFIX}{BATCHES}.ckpt"
    )
    assert (root / "checkpoints" / "end-epoch=0.ckpt").is_file()
    second = StopCheckpoint()
    saver = ModelCheckpoint(dirpath=tmp_path / "b" / "checkpoints", every_n_train_steps=1000)
    with pytest.raises(SystemExit):
        fit(
            tmp_path / "b",
            short_video,
            by_steps,
            ckpt=first.saved,
            callbacks=[SignalAt(BATCHES + 2), saver, second],
        )
    position = torch.load(second.saved, weights_only=True)["VideoClipDataModule"]
    assert (position["epoch"], position["batches_done"]) == (1, 2)
    pl.seed_everything(123)
    resumed, batches = fit(tmp_path / "c", short_video, by_steps=by_steps, ckpt=second.saved)
    check_resumed(resumed, batches, expected, straight_batches, BATCHES + 2)


def test_the_step_a_stop_is_taken_on_is_logged(tmp_path, short_video):
    """Its metrics (train/loss, ...) reached the loggers for every step but the one the stop was taken on."""
    from test_throughput import Recorded

    logger, stopper = Recorded(), StopCheckpoint()
    saver = ModelCheckpoint(dirpath=tmp_path / "checkpoints", every_n_train_steps=1000)
    trainer = make_trainer(
        tmp_path,
        -1,
        max_epochs=3,
        logger=logger,
        log_every_n_steps=1,
        enable_checkpointing=True,
        callbacks=[SignalAt(4), saver, stopper],
    )
    pl.seed_everything(0)
    with pytest.raises(SystemExit) as stopped:
        trainer.fit(DoRAModule(**MICRO), datamodule=make_data(short_video))
    assert stopped.value.code == 143 and stopper.saved.name == f"{STOPPED_PREFIX}4.ckpt"
    assert [step for step, metrics in logger.rows if "train/loss" in metrics] == [0, 1, 2, 3]


def test_no_stop_inside_gradient_accumulation(tmp_path, short_video):
    """Asked to stop after the first of 2 accumulated batches, the run stops after the second (the optimiser's
    step): the accumulated gradients are not in a checkpoint."""
    stopper = StopCheckpoint()
    saver = ModelCheckpoint(dirpath=tmp_path / "checkpoints", every_n_train_steps=1000)
    sender = SignalAt(0)  # after batch 0: no optimiser step yet
    trainer = make_trainer(
        tmp_path, 4, accumulate_grad_batches=2, enable_checkpointing=True, callbacks=[sender, saver, stopper]
    )
    with pytest.raises(SystemExit):
        trainer.fit(DoRAModule(**MICRO), datamodule=make_data(short_video))
    assert stopper.saved == tmp_path / "checkpoints" / f"{STOPPED_PREFIX}1.ckpt"
    assert torch.load(stopper.saved, weights_only=True)["VideoClipDataModule"]["batches_done"] == 2


def test_ctrl_c_saves_and_exits_130_and_keeps_only_the_newest_stop(
    tmp_path, short_video, keep_sigint, capsys
):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    (folder / f"{STOPPED_PREFIX}1.ckpt").write_bytes(b"an older stop")
    stopped, stopper = stop_run(tmp_path, short_video, SignalAt(2, (signal.SIGINT,)))
    assert stopped.code == 130
    assert sorted(p.name for p in folder.glob(f"{STOPPED_PREFIX}*")) == [f"{STOPPED_PREFIX}2.ckpt"]
    state = torch.load(folder / f"{STOPPED_PREFIX}2.ckpt", weights_only=True)
    assert state["global_step"] == 2 and state["VideoClipDataModule"]["batches_done"] == 2
    err = capsys.readouterr().err
    assert "Ctrl-C: finishing this step" in err
    assert f"stopped by Ctrl-C after step 2; saved {folder / STOPPED_PREFIX}2.ckpt" in err
    assert signal.getsignal(signal.SIGINT) != stopper._on_signal  # the handlers are gone after the run
    assert signal.getsignal(signal.SIGTERM) != stopper._on_signal


def test_second_ctrl_c_stops_at_once_without_a_checkpoint(tmp_path, short_video, keep_sigint):
    stopped, stopper = stop_run(tmp_path, short_video, SignalAt(2, (signal.SIGINT, signal.SIGINT)))
    assert stopped.code == 1  # Lightning's KeyboardInterrupt exit
    assert stopper.saved is None and not list(tmp_path.rglob(f"{STOPPED_PREFIX}*"))


class SignalOnSave(Callback):
    """Sends SIGINT to this process while a checkpoint of step ``step`` is being written."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGINT)


def test_second_ctrl_c_while_saving_stops_at_once_in_one_line(tmp_path, short_video, keep_sigint, capsys):
    """It gave a KeyboardInterrupt traceback and exit 130 (a saved Ctrl-C stop's status)."""
    stopper = StopCheckpoint()
    saver = ModelCheckpoint(dirpath=tmp_path / "checkpoints", every_n_train_steps=1000)
    pl.seed_everything(0)
    with pytest.raises(SystemExit) as stopped:
        fit(
            tmp_path,
            short_video,
            False,
            callbacks=[SignalAt(2, (signal.SIGINT,)), SignalOnSave(2), saver, stopper],
        )
    assert stopped.value.code == 1 and stopper.saved is None
    assert not list(tmp_path.rglob(f"{STOPPED_PREFIX}*")) and not list(tmp_path.rglob("*.tmp*"))
    err = capsys.readouterr().err
    assert (
        "dora fit: stopped by Ctrl-C after step 2; Ctrl-C again while saving: stopped at once, nothing saved"
        in err
    )


def test_save_false_stops_without_a_checkpoint(tmp_path, short_video, capsys):
    stopped, stopper = stop_run(tmp_path, short_video, SignalAt(2), save=False)
    assert stopped.code == 143 and stopper.saved is None
    assert not list(tmp_path.rglob(f"{STOPPED_PREFIX}*"))
    assert "stopped by SIGTERM after step 2; nothing saved (--on_stop.save false)" in capsys.readouterr().err


@pytest.mark.parametrize("stop_at", [None, BATCHES + 1])
def test_a_run_ended_before_its_planned_steps_says_so(stop_at, tmp_path, short_video, capsys):
    from test_resume import StopAfterStep

    callbacks = [StopCheckpoint()] + ([StopAfterStep(stop_at)] if stop_at else [])
    module = DoRAModule(**MICRO)
    trainer = make_trainer(tmp_path, -1, max_epochs=2, callbacks=callbacks, enable_checkpointing=True)
    trainer.fit(module, datamodule=make_data(short_video))
    err = capsys.readouterr().err
    if stop_at is None:  # a run that ends as planned says nothing
        assert module.global_step == 2 * BATCHES and "stopped by" not in err
    else:
        assert (
            f"dora fit: stopped by trainer.should_stop after step {stop_at} of the {2 * BATCHES} planned; "
            "continue with the same command and --ckpt_path last\n"
        ) in err


class SlowSteps(Callback):
    """Each step takes at least ``seconds``: a 1 s ``max_time`` stops the run after a few steps."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        time.sleep(self.seconds)


def test_max_time_is_each_invocations_budget(tmp_path, short_video, capsys):
    """A run stopped by ``trainer.max_time`` and continued as its line says (the same command, ``--ckpt_path last``)
    trains again for ``max_time``: Lightning's Timer restored the stopped run's time, and the resumed run stopped
    before its first step."""
    folder = tmp_path / "checkpoints"

    def run(ckpt: Path | None = None) -> int:
        saver = ModelCheckpoint(dirpath=folder, every_n_train_steps=1, save_last=True)
        trainer = make_trainer(
            tmp_path, 60, max_time={"seconds": 1}, enable_checkpointing=True,
            callbacks=[SlowSteps(0.3), saver, StopCheckpoint()],
        )  # fmt: skip
        trainer.fit(DoRAModule(**MICRO), datamodule=make_data(short_video), ckpt_path=ckpt)
        return trainer.global_step

    first = run()
    assert 0 < first < 60
    err = capsys.readouterr().err
    said = rf"dora fit: stopped by trainer\.max_time \(\d+ s in this invocation\) after step {first} of the 60 planned"
    assert re.search(said, err), err
    assert "--ckpt_path last (trainer.max_time counts each invocation from its start)" in err
    second = run(folder / "last.ckpt")
    assert second > first, "the resumed run trained nothing"
    assert torch.load(folder / "last.ckpt", weights_only=True)["global_step"] == second


def test_checkpoint_after_fit_resumes_at_the_next_epoch(tmp_path, short_video, straight):
    """A checkpoint written after ``fit`` returned (trainer.save_checkpoint) continues with the next epoch's clips
    (the weights differ from the straight run's: a 1-epoch run's schedules end where a 3-epoch run's do not)."""
    by_steps, _, straight_batches = straight
    pl.seed_everything(0)
    module = fit_epochs(tmp_path / "a", short_video, 1)
    after = tmp_path / "after_fit.ckpt"
    module.trainer.save_checkpoint(after)
    assert torch.load(after, weights_only=True)["VideoClipDataModule"]["epoch"] == 1
    pl.seed_everything(123)
    resumed, batches = fit(tmp_path / "b", short_video, by_steps=by_steps, ckpt=after)
    assert batches == straight_batches[BATCHES:]


def fit_epochs(root: Path, video: Path, epochs: int):
    module = DoRAModule(**MICRO)
    make_trainer(root, -1, max_epochs=epochs).fit(module, datamodule=make_data(video))
    return module


def _shielded_worker(ready) -> None:
    shield_worker_from_stop_signals(0)
    os.kill(os.getpid(), signal.SIGINT)  # ignored: no KeyboardInterrupt
    os.kill(os.getpid(), signal.SIGTERM)  # ignored, however many
    os.kill(os.getpid(), signal.SIGTERM)
    os.kill(os.getpid(), signal.SIGUSR1)  # SLURM's requeue signal
    ready.set()
    time.sleep(60)  # until the test kills it


def test_loader_workers_ignore_ctrl_c_and_sigterm():
    """A worker survives a process group's Ctrl-C and SIGTERMs: the training process decides when it ends."""
    context = multiprocessing.get_context("spawn")  # nothing inherited from this process's handlers
    ready = context.Event()
    worker = context.Process(target=_shielded_worker, args=(ready,))
    worker.start()
    deadline = time.monotonic() + 60
    while not ready.wait(0.1) and worker.is_alive() and time.monotonic() < deadline:
        pass
    try:
        assert ready.is_set() and worker.is_alive(), (
            f"the worker died of a signal (exit code {worker.exitcode})"
        )
    finally:
        worker.kill()
        worker.join(10)


def test_clip_loader_starts_its_workers_shielded(tmp_path, short_video):
    data = make_data(short_video, num_workers=1)
    data.setup("fit")
    assert data.train_dataloader().worker_init_fn is shield_worker_from_stop_signals


def test_fit_in_another_thread_leaves_the_signals_alone(tmp_path, short_video):
    """Python takes signal handlers from the main thread only: a fit in another thread trains without them."""
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            trainer = make_trainer(tmp_path, 2, callbacks=[StopCheckpoint()])
            trainer.fit(DoRAModule(**MICRO), datamodule=make_data(short_video))
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(120)
    assert not errors, errors
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def test_lightnings_per_step_broadcast_is_off_for_the_fit_alone(tmp_path):
    """The broadcast Lightning's training loop makes before every batch of a multi-process run (and reads back) is
    shadowed on this trainer's loop while the callback holds the signals, and Lightning's method is back after."""
    trainer = make_trainer(tmp_path, 1)
    loop = trainer.fit_loop.epoch_loop
    original = getattr(type(loop), LIGHTNING_BROADCAST)  # the pinned Lightning has it: a rename fails here
    stopper = StopCheckpoint()
    stopper._quiet_lightning_broadcast(trainer)
    assert getattr(loop, LIGHTNING_BROADCAST)() is None and LIGHTNING_BROADCAST in vars(loop)
    stopper._release()
    assert getattr(loop, LIGHTNING_BROADCAST).__func__ is original
