"""EvaluateDuringFit: an evaluator plugin run before training and every N epochs, its metrics logged; the run trains
the same weights with or without it; a failure after an epoch is one line and training goes on."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from conftest import REPO
from lightning.pytorch.callbacks import ModelCheckpoint
from test_cli import MICRO_ARGS
from test_knn import write_image_folder
from test_module import MICRO, clip_video, make_data, make_trainer  # noqa: F401 - clip_video is a fixture
from test_throughput import Recorded

from dora_lightning.evaluation.contract import Evaluator
from dora_lightning.evaluation.during_fit import EvaluateDuringFit, isolated_randomness
from dora_lightning.module import DoRAModule
from dora_lightning.stopping import STOPPED_PREFIX, StopCheckpoint
from evaluators.knn import KNNEvaluator
from evaluators.linear import LinearProbeEvaluator


@pytest.fixture(scope="module")
def colours(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("colours"), train_per_class=6, val_per_class=3, size=32)


def linear(data: Path) -> LinearProbeEvaluator:
    """A probe that seeds everything and trains (draws from every generator it can)."""
    return LinearProbeEvaluator(
        data_dir=str(data), image_size=32, batch_size=8, num_workers=0, n_last_blocks=2, epochs=2, seed=5
    )


def fit(
    root: Path, video: Path, callbacks: list, epochs: int = 3, checkpoints: bool = False
) -> tuple[DoRAModule, Recorded]:
    pl.seed_everything(0)
    module, logger = DoRAModule(**MICRO), Recorded()
    trainer = make_trainer(
        root,
        -1,
        max_epochs=epochs,
        limit_train_batches=2,
        logger=logger,
        callbacks=callbacks,
        enable_checkpointing=checkpoints,
    )
    trainer.fit(module, datamodule=make_data(video))
    return module, logger


def test_a_run_trains_the_same_weights_with_or_without_it(tmp_path, clip_video, colours, capfd):  # noqa: F811
    assert MICRO.get("drop_path_rate", 0.1) > 0  # the training draws from torch's generator every step
    plain, _ = fit(tmp_path / "plain", clip_video, [])
    during = EvaluateDuringFit(linear(colours), every_n_epochs=1)
    evaluated, logger = fit(tmp_path / "evaluated", clip_video, [during])
    lrs = re.findall(r"linear/top1_best_lr ([^,]+),", capfd.readouterr().err)
    assert len(lrs) == 4 and all(
        float(lr) == during.history[0]["metrics"]["linear/top1_best_lr"] for lr in lrs
    )
    assert 0 < float(lrs[0]) < 0.01  # the line writes small values with their digits (before: 0.00)
    for (name, a), (_, b) in zip(plain.state_dict().items(), evaluated.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert [(row["epoch"], row["step"]) for row in during.history] == [(0, 0), (1, 2), (2, 4), (3, 6)]
    steps = [step for step, metrics in logger.rows if "eval/linear/top1_best" in metrics]
    assert steps == [0, 2, 4, 6]


def test_every_n_epochs_and_the_last_epoch(tmp_path, clip_video, colours):  # noqa: F811
    knn = KNNEvaluator(ks=[3], data_dir=str(colours), image_size=32, batch_size=8, num_workers=0)
    during = EvaluateDuringFit(knn, every_n_epochs=2, at_start=False)
    _, logger = fit(tmp_path, clip_video, [during], epochs=3)
    assert [row["epoch"] for row in during.history] == [2, 3]
    logged = [metrics for _, metrics in logger.rows if any(k.startswith("eval/") for k in metrics)]
    assert [sorted(metrics) for metrics in logged] == [["eval/knn/top1_k3", "eval/knn/top5_k3"]] * 2


def test_no_epoch_limit_is_not_a_last_epoch(tmp_path, clip_video, colours):  # noqa: F811
    """max_epochs -1 (a run bounded by max_steps): every N epochs only, not after each epoch as if it were the last."""
    knn = KNNEvaluator(ks=[3], data_dir=str(colours), image_size=32, batch_size=8, num_workers=0)
    during = EvaluateDuringFit(knn, every_n_epochs=2, at_start=False)
    pl.seed_everything(0)
    trainer = make_trainer(tmp_path, 6, max_epochs=-1, limit_train_batches=2, callbacks=[during])
    trainer.fit(DoRAModule(**MICRO), datamodule=make_data(clip_video))
    assert [row["epoch"] for row in during.history] == [2]  # epoch 3 ends at max_steps: not a multiple of 2


def test_a_failure_after_an_epoch_is_said_and_training_goes_on(tmp_path, clip_video, colours, capfd):  # noqa: F811
    knn = KNNEvaluator(ks=[3], data_dir=str(colours), image_size=32, batch_size=8, num_workers=0)
    during = EvaluateDuringFit(knn, at_start=False)
    knn.data_dir = str(tmp_path / "gone")  # the labelled data went away during training
    module, _ = fit(tmp_path, clip_video, [during], epochs=2)
    err = capfd.readouterr().err
    assert err.count("dora fit: eval_during (knn) failed after epoch") == 2, err
    assert "gone" in err and during.history == []
    assert module.global_step == 4


def test_a_failure_before_training_stops_the_run(tmp_path, clip_video):  # noqa: F811
    knn = KNNEvaluator(ks=[3], data_dir=str(tmp_path / "missing"), image_size=32, num_workers=0)
    with pytest.raises(FileNotFoundError, match="missing"):
        fit(tmp_path, clip_video, [EvaluateDuringFit(knn)])


def test_isolated_randomness_restores_every_generator():
    import os
    import random

    import numpy as np

    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    expected = (torch.rand(2), np.random.rand(2), random.random())
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    seed_before = os.environ.get("PL_GLOBAL_SEED")
    with isolated_randomness(torch.device("cpu")):
        pl.seed_everything(123)
        torch.rand(5), np.random.rand(5), random.random()
    assert os.environ.get("PL_GLOBAL_SEED") == seed_before
    got = (torch.rand(2), np.random.rand(2), random.random())
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2] == expected[2]


def fit_command(root: Path, colours: Path, epochs: int, *extra: str) -> list[str]:
    """`dora fit` of the micro model on the bundled video for ``epochs`` epochs of 2 batches, k-NN (k=3) on
    ``colours`` during it, and ``extra`` options."""
    return [
        sys.executable,
        "-m",
        "dora_lightning.cli",
        "fit",
        *MICRO_ARGS,
        f"--data.paths={REPO / 'assets/video/vtest.mp4'}",
        f"--trainer.default_root_dir={root}",
        f"--trainer.max_epochs={epochs}",
        "--trainer.limit_train_batches=2",
        "--eval_during.evaluator=knn",
        f"--eval_during.evaluator.data_dir={colours}",
        "--eval_during.evaluator.image_size=32",
        "--eval_during.evaluator.ks=[3]",
        *extra,
    ]


def test_dora_fit_takes_an_evaluator_by_its_short_name(tmp_path, colours):
    """`--eval_during.evaluator knn` with its options: one line before training and one after the epoch; an unknown
    name is one line and exit status 2."""
    command = fit_command(tmp_path / "run", colours, 1, "--eval_during.evaluator.num_workers=0")
    run = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "dora fit: knn before training: knn/top1_k3 " in run.stderr
    assert "dora fit: knn after epoch 1 (step 2): knn/top1_k3 " in run.stderr
    wrong = [
        arg if not arg.startswith("--eval_during.evaluator=") else "--eval_during.evaluator=knnn"
        for arg in command
    ]
    refused = subprocess.run(wrong, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert refused.returncode == 2
    (line,) = [line for line in refused.stderr.splitlines() if "error:" in line]
    assert line.startswith("dora fit: error: --eval_during.evaluator: ") and "knnn" in line


@pytest.mark.slow
def test_a_two_process_run_evaluates_on_process_zero(tmp_path, colours):
    """2 DDP processes (CPU, gloo): process 0 evaluates, the other waits at the barrier; one line each time."""
    ddp = ("--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.use_distributed_sampler=false")
    run = subprocess.run(
        fit_command(tmp_path / "run", colours, 2, *ddp), capture_output=True, text=True, timeout=300, cwd=REPO
    )
    assert run.returncode == 0, run.stderr[-3000:]
    lines = [line for line in run.stderr.splitlines() if line.startswith("dora fit: knn ")]
    assert [line.split(":")[1] for line in lines] == [
        " knn before training",
        " knn after epoch 1 (step 2)",
        " knn after epoch 2 (step 4)",
    ], run.stderr[-3000:]


class _SignalledValidation(pl.LightningModule):
    """Five validation batches; with ``signal_at_start``, SIGTERM to this process in the first (as a preemption)."""

    def __init__(self, signal_at_start: bool) -> None:
        super().__init__()
        self.signal_at_start, self.seen = signal_at_start, 0

    def validation_step(self, batch, batch_idx) -> None:
        self.seen += 1
        if batch_idx == 0 and self.signal_at_start:
            os.kill(os.getpid(), signal.SIGTERM)

    def val_dataloader(self):
        return torch.utils.data.DataLoader(torch.zeros(5, 1), batch_size=1)


class PreemptedEvaluator(Evaluator):
    """Runs its own Trainer like the real evaluators; SIGTERM arrives during its second evaluation."""

    name = "preempted"

    def __init__(self) -> None:
        super().__init__()
        self.calls, self.seen = 0, []

    def evaluate(self, backbone, trainer_kwargs):
        self.calls += 1
        module = _SignalledValidation(signal_at_start=self.calls == 2)
        pl.Trainer(**trainer_kwargs).validate(module)
        self.seen.append(module.seen)
        return {"preempted/seen": float(module.seen)}


def test_sigterm_cuts_an_evaluation_short(tmp_path, clip_video, capfd):  # noqa: F811
    """The evaluator's own Trainer stops its loop on SIGTERM; the run neither dies inside the epoch's end hooks (before
    its epoch-end checkpoint) nor trains on: the epoch's checkpoint is written and the run stops after one more step,
    saved, exit 143."""
    evaluator = PreemptedEvaluator()
    saver = ModelCheckpoint(dirpath=tmp_path / "checkpoints", every_n_epochs=1, save_top_k=-1)
    callbacks = [EvaluateDuringFit(evaluator), StopCheckpoint(), saver]
    with pytest.raises(SystemExit) as stopped:
        fit(tmp_path, clip_video, callbacks, checkpoints=True)
    assert stopped.value.code == 143
    assert evaluator.calls == 2 and evaluator.seen == [5]  # the second evaluation did not finish
    err = capfd.readouterr().err
    assert "dora fit: eval_during (preempted) after epoch 1 cut short by SIGTERM" in err
    names = sorted(path.name for path in (tmp_path / "checkpoints").iterdir())
    assert names == ["epoch=0-step=2.ckpt", f"{STOPPED_PREFIX}3.ckpt"]


def test_a_stop_on_an_epochs_last_step_leaves_its_evaluation_out(tmp_path, clip_video, colours, capfd):  # noqa: F811
    """SIGTERM on an epoch's last step: the epoch's checkpoint is written, its evaluation is left out (a preemption's
    notice is short), then the run stops, saved."""
    from test_stopping import SignalAt

    knn = KNNEvaluator(ks=[3], data_dir=str(colours), image_size=32, batch_size=8, num_workers=0)
    during = EvaluateDuringFit(knn, at_start=False)
    saver = ModelCheckpoint(dirpath=tmp_path / "checkpoints", every_n_epochs=1, save_top_k=-1)
    with pytest.raises(SystemExit) as stopped:
        fit(tmp_path, clip_video, [SignalAt(2), during, StopCheckpoint(), saver], checkpoints=True)
    assert stopped.value.code == 143 and during.history == []
    assert "dora fit: eval_during (knn) after epoch 1 left out: the run is stopping" in capfd.readouterr().err
    names = sorted(path.name for path in (tmp_path / "checkpoints").iterdir())
    assert names == ["epoch=0-step=2.ckpt", f"{STOPPED_PREFIX}2.ckpt"]


def _linear_fit_command(root: Path, colours: Path, *extra: str) -> list[str]:
    """fit_command with the linear probe (1 epoch) in place of k-NN, 1 epoch of training, 2 DDP processes."""
    command = [
        "--eval_during.evaluator=linear" if arg == "--eval_during.evaluator=knn" else arg
        for arg in fit_command(root, colours, 1)
        if not arg.startswith("--eval_during.evaluator.ks=")
    ]
    return [
        *command,
        "--eval_during.evaluator.epochs=1",
        "--eval_during.evaluator.batch_size=8",
        "--eval_during.evaluator.num_workers=0",
        "--trainer.strategy=ddp",
        "--trainer.devices=2",
        "--trainer.use_distributed_sampler=false",
        *extra,
    ]


@pytest.mark.slow
def test_a_two_process_run_evaluates_the_linear_probe_and_stops_together_when_it_fails(tmp_path, colours):
    """The linear probe's metrics (torchmetrics) synced over torch.distributed's group, which in dora fit is the
    training's: process 0 met the other process's training collectives and the run hung at the first evaluation.
    A strict evaluation that fails on process 0 ends every process, with one line naming dora fit's option (before:
    the others waited at a barrier, up to NCCL's 30-minute timeout on GPUs; on the CPU they crashed with a
    traceback)."""
    ok = _linear_fit_command(tmp_path / "ok", colours, "--eval_during.evaluator.n_last_blocks=2")
    run = subprocess.run(ok, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = [line for line in run.stderr.splitlines() if line.startswith("dora fit: linear ")]
    assert [line.split(":")[1] for line in lines] == [
        " linear before training",
        " linear after epoch 1 (step 2)",
    ]

    failing = _linear_fit_command(
        tmp_path / "failing", colours
    )  # n_last_blocks 4 > the micro model's 2 blocks
    run = subprocess.run(failing, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert run.returncode == 2, run.stderr[-3000:]
    errors = [
        line for line in run.stderr.splitlines() if "error" in line.lower() and "dora fit: plan" not in line
    ]
    assert errors == [
        "dora fit: error: n_last_blocks=4 exceeds the depth of the checkpoint's backbone (2 blocks); give "
        "--eval_during.evaluator.n_last_blocks between 1 and 2"
    ], run.stderr[-3000:]


SLOW_EVALUATION_FIT = """
import sys
import time
from datetime import timedelta

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import DDPStrategy

sys.path.insert(0, {tests!r})
from conftest import MICRO_MODULE  # noqa: E402

from dora_lightning.evaluation.contract import Evaluator  # noqa: E402
from dora_lightning.evaluation.during_fit import EvaluateDuringFit  # noqa: E402
from dora_lightning.module import DoRAModule  # noqa: E402


class Sleepy(Evaluator):
    name = "sleepy"

    def evaluate(self, backbone, trainer_kwargs):
        time.sleep({evaluation_s})
        return {{"sleepy/slept": {evaluation_s}.0}}


generator = torch.Generator().manual_seed(0)
batch = {{
    "global_views": [torch.randn(2, 2, 3, 32, 32, generator=generator)],
    "local_views": [torch.randn(2, 2, 3, 16, 16, generator=generator) for _ in range(2)],
}}
trainer = pl.Trainer(
    default_root_dir={root!r}, accelerator="cpu", devices=2, max_steps=2, logger=False,
    strategy=DDPStrategy(timeout=timedelta(seconds={group_timeout_s})),
    callbacks=[EvaluateDuringFit(Sleepy(), every_n_epochs=0)], enable_checkpointing=False,
    enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
)
trainer.fit(DoRAModule(**MICRO_MODULE), torch.utils.data.DataLoader([batch] * 2, batch_size=None))
"""


@pytest.mark.slow
def test_the_other_processes_wait_for_an_evaluation_longer_than_the_process_group_timeout(tmp_path):
    """Process 0 evaluates for longer than the training process group's timeout (6 s here, 30 min by Lightning's
    default): the other process waits for it outside that group and the run trains on (before: its wait was a
    collective of the training's group, which timed out and ended the run; on GPUs NCCL's watchdog aborts it)."""
    script = tmp_path / "fit.py"
    script.write_text(
        SLOW_EVALUATION_FIT.format(
            tests=str(REPO / "tests"), root=str(tmp_path), evaluation_s=14, group_timeout_s=6
        )
    )
    run = subprocess.run([sys.executable, str(script)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "dora fit: sleepy before training: sleepy/slept 14" in run.stderr, run.stderr[-3000:]


def test_wait_hours_must_be_positive():
    with pytest.raises(ValueError, match="eval_during.wait_hours must be > 0, got 0"):
        EvaluateDuringFit(wait_hours=0)
