"""SIGTERM / Ctrl-C: the run finishes its step, writes stopped-step=S.ckpt, exits 143 / 130, and resumes exactly."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from conftest import REPO
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from test_cli import MICRO_ARGS
from test_module import MICRO, make_data, make_trainer
from test_resume import BATCHES, check_resumed, fit, short_video, weights

from dora_lightning.cli import main
from dora_lightning.data.loader import shield_worker_from_stop_signals
from dora_lightning.module import DoRAModule
from dora_lightning.runs import find_last_checkpoint
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


def test_save_false_stops_without_a_checkpoint(tmp_path, short_video, capsys):
    stopped, stopper = stop_run(tmp_path, short_video, SignalAt(2), save=False)
    assert stopped.code == 143 and stopper.saved is None
    assert not list(tmp_path.rglob(f"{STOPPED_PREFIX}*"))
    assert "stopped by SIGTERM after step 2; nothing saved (--on_stop.save false)" in capsys.readouterr().err


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


def fit_command(root: Path, workers: int, callback: dict, *extra: str) -> tuple[list[str], list[str], dict]:
    """`dora fit` of the micro model on the bundled video in ``root`` with ``workers`` loader workers, the test
    callback ``callback`` (from tests/stop_signals.py) and ``extra`` options: its arguments, the command that runs it
    in a subprocess, and that subprocess's environment (tests/ importable)."""
    args = [
        "fit",
        *[a for a in MICRO_ARGS if not a.startswith("--data.num_workers")],
        f"--data.num_workers={workers}",
        f"--data.paths={REPO / 'assets/video/vtest.mp4'}",
        f"--trainer.default_root_dir={root}",
        *extra,
    ]
    command = [sys.executable, "-m", "dora_lightning.cli", *args, f"--trainer.callbacks+={callback}"]
    env = os.environ | {
        "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])
    }
    return args, command, env


@pytest.mark.slow
@pytest.mark.parametrize("signum, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_dora_fit_stopped_with_its_workers_saves_and_resumes(tmp_path, signum, status):
    """`dora fit` with 2 loader workers, the signal sent to the whole process group (a terminal's Ctrl-C, SLURM,
    pkill): the workers survive it, the step finishes, the checkpoint is written, `--ckpt_path last` continues."""
    root = tmp_path / "run"
    sender = {"class_path": "stop_signals.SignalGroupAt", "init_args": {"step": 2, "signum": int(signum)}}
    args, command, env = fit_command(root, 2, sender, "--trainer.max_steps=6")
    run = subprocess.run(
        command,
        capture_output=True,
        text=True,
        env=env,
        start_new_session=True,  # its own process group, workers included
        timeout=300,
    )
    assert run.returncode == status, run.stderr[-3000:]
    saved = root / "checkpoints" / f"{STOPPED_PREFIX}2.ckpt"
    assert saved.is_file(), run.stderr[-3000:]
    assert "killed by signal" not in run.stderr and "exited unexpectedly" not in run.stderr
    name = "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"
    assert f"dora fit: stopped by {name} after step 2; saved {saved}" in run.stderr
    main([*args, "--ckpt_path=last"])
    newest = find_last_checkpoint([root / "checkpoints"])
    assert newest is not None and newest != saved
    assert torch.load(newest, weights_only=True)["global_step"] == 6


SLURM_JOB = {
    "SLURM_JOB_ID": "4242",
    "SLURM_JOB_NAME": "dora",
    "SLURM_NTASKS": "1",
    "SLURM_NTASKS_PER_NODE": "1",
    "SLURM_NNODES": "1",
    "SLURM_PROCID": "0",
    "SLURM_LOCALID": "0",
    "SLURM_NODEID": "0",
    "SLURM_NODELIST": "127.0.0.1",
}


def fake_scontrol(folder: Path, status: int = 0) -> Path:
    """An ``scontrol`` that writes its arguments to ``folder/scontrol.args`` and exits with ``status``."""
    script = folder / "scontrol"
    script.write_text(f'#!/bin/sh\necho "$@" > {folder / "scontrol.args"}\nexit {status}\n')
    script.chmod(0o755)
    return folder / "scontrol.args"


@pytest.mark.slow
def test_slurm_requeue_signal_saves_at_a_step_and_requeues(tmp_path):
    """Under SLURM (its variables set; a fake scontrol), USR1 (``--signal=USR1@90``) to the job: the step finishes,
    the checkpoint is saved, the job is requeued and the process exits 138; the loader workers survive the signal, no
    hpc_ckpt is written from inside a signal handler, and the requeued script's --ckpt_path last continues."""
    root, bin_dir = tmp_path / "run", tmp_path / "bin"
    bin_dir.mkdir()
    called = fake_scontrol(bin_dir)
    sender = {
        "class_path": "stop_signals.SignalGroupAt",
        "init_args": {"step": 2, "signum": int(signal.SIGUSR1)},
    }
    args, command, env = fit_command(root, 2, sender, "--trainer.max_steps=6")
    env = env | SLURM_JOB | {"PATH": f"{bin_dir}{os.pathsep}{env['PATH']}"}
    run = subprocess.run(
        command, capture_output=True, text=True, env=env, start_new_session=True, timeout=300
    )
    assert run.returncode == 128 + signal.SIGUSR1, run.stderr[-3000:]
    saved = root / "checkpoints" / f"{STOPPED_PREFIX}2.ckpt"
    assert (
        f"dora fit: stopped by SIGUSR1 (SLURM's requeue signal) after step 2; saved {saved}; requeued SLURM job "
        "4242: its script continues the run with --ckpt_path last" in run.stderr
    ), run.stderr[-3000:]
    assert called.read_text().split() == ["requeue", "4242"]
    assert not list(root.rglob("hpc_ckpt*")) and "exited unexpectedly" not in run.stderr
    main([*args, "--ckpt_path=last"])
    newest = find_last_checkpoint([root / "checkpoints"])
    assert torch.load(newest, weights_only=True)["global_step"] == 6


def test_a_failed_requeue_is_said(tmp_path, monkeypatch):
    """scontrol failing (or missing) is named in the stop's line, with what to do."""
    from dora_lightning.stopping import _requeue

    monkeypatch.setenv("PATH", str(tmp_path))
    for key, value in SLURM_JOB.items():
        monkeypatch.setenv(key, value)
    assert _requeue().startswith("`scontrol requeue 4242` failed (")
    fake_scontrol(tmp_path, status=1)
    assert (
        _requeue() == "`scontrol requeue 4242` failed (exit status 1); resubmit the job with --ckpt_path last"
    )
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "77")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert _requeue().startswith("`scontrol requeue 77_3` failed")
    for key in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID"):
        monkeypatch.delenv(key)
    assert _requeue().startswith("not requeued: no SLURM_JOB_ID")


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


@pytest.mark.slow
def test_two_process_ddp_run_stops_together_and_exits(tmp_path):
    """2 CPU processes (gloo DDP) with a loader worker each, SIGTERM sent to the process group from outside, 1 s after
    step 5 (inside some step): both stop after the same step, one checkpoint, exit status 143, no hang. (Lightning's
    own handler, which broadcasts from inside the signal handler, passes this too; it hung or aborted in 3 of 5 longer
    runs signalled after 30 s, across epoch ends: docs/training.md, "Stopping".)

    Each batch's agreement is one all-reduce of a CPU tensor over a gloo group of its own (on GPUs: no wait for the
    device), and Lightning's per-step SIGTERM broadcast from process 0 is off."""
    root, marker, log = tmp_path / "run", tmp_path / "step5", tmp_path / "collectives"
    toucher = {"class_path": "stop_signals.TouchAt", "init_args": {"step": 5, "path": str(marker)}}
    logger = {"class_path": "stop_signals.CollectiveLog", "init_args": {"path": str(log)}}
    ddp = ["--trainer.max_steps=100000", "--trainer.strategy=ddp", "--trainer.devices=2"]
    ddp += ["--trainer.use_distributed_sampler=false", f"--trainer.callbacks+={json.dumps(logger)}"]
    _, command, env = fit_command(root, 1, toucher, *ddp)
    run = subprocess.Popen(
        command,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env=env,
        start_new_session=True,  # its own process group: the two processes and their workers
    )
    try:
        deadline = time.monotonic() + 180
        while not marker.exists() and run.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert marker.exists(), "the run did not reach step 5"
        time.sleep(1.0)
        os.killpg(run.pid, signal.SIGTERM)
        _, stderr = run.communicate(timeout=120)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    assert run.returncode == 143, stderr[-3000:]
    stopped = [p.name for p in (root / "checkpoints").glob(f"{STOPPED_PREFIX}*")]
    assert len(stopped) == 1, stopped
    assert stderr.count("dora fit: stopped by SIGTERM after step") == 1  # said once, by process 0
    for rank in (0, 1):
        record = json.loads(Path(f"{log}.{rank}.json").read_text())
        assert record["batches"] >= 5
        assert [c for c in record["calls"] if c["op"] == "broadcast"] == []
        # the others are the centre's all-reduce (core/loss.py, the method's; on a GPU it is queued, not waited for)
        agreements = [c for c in record["calls"] if c["caller"] == "stopping.py"]
        agreement = {
            "op": "all_reduce",
            "device": "cpu",
            "world": False,
            "backend": "gloo",
            "caller": "stopping.py",
        }
        # the log is written in its own batch-end hook, which may run before the agreement's
        assert agreements in ([agreement] * record["batches"], [agreement] * (record["batches"] - 1))


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
