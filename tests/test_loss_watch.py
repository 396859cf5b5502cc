"""LossWatch across processes: the finiteness of every process's loss is all-reduced and each process reads the
losses of the batches before the newest, so all processes stop on the same non-finite step after the same batch
(one process stopping alone would leave the others in the next collective)."""

from __future__ import annotations

import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import MICRO_MODULE, REPO
from test_ddp import free_port

from dora_lightning.diagnostics import NonFiniteLossError, TrainingDiagnostics
from dora_lightning.loss_watch import LossWatch
from dora_lightning.module import DoRAModule

BATCHES = 6
NAN_STEP = 3  # process 1's loss alone is NaN at this step


def losses_of(rank: int) -> list[float]:
    return [float("nan") if rank == 1 and step == NAN_STEP else 1.0 + step for step in range(BATCHES)]


def watch_losses(rank: int, port: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        watch, seen = LossWatch(across_processes=True), []
        for step, loss in enumerate(losses_of(rank)):
            watch.push(step, 0, torch.tensor(loss))
            seen.append([(r.step, r.finite, r.value) for r in watch.ready()])
        seen.append([(r.step, r.finite, r.value) for r in watch.ready(wait=True)])  # the epoch's end
        out[rank] = seen
    finally:
        dist.destroy_process_group()


def test_every_process_reads_the_same_non_finite_step_after_the_same_batch():
    with mp.Manager() as manager:
        shared = manager.dict()
        mp.spawn(watch_losses, args=(free_port(), shared), nprocs=2, join=True)
        out = dict(shared)
    for rank in (0, 1):
        batches = out[rank]
        assert batches[0] == []  # the newest loss is left for the next batch
        assert [[step for step, _, _ in readings] for readings in batches] == [
            [],
            [0],
            [1],
            [2],
            [3],
            [4],
            [5],
        ]
        assert [finite for readings in batches for _, finite, _ in readings] == [True] * 3 + [False] + [
            True
        ] * 2
    assert (
        out[0][4][0][2] == 4.0
    )  # process 0's own loss was finite: its reading says so, and the flag does not
    assert out[1][4][0][2] != out[1][4][0][2]  # NaN


class _Module(TrainingDiagnostics):
    def __init__(self, world_size: int) -> None:
        self.trainer = SimpleNamespace(world_size=world_size)


@pytest.mark.parametrize(("world_size", "group"), [(1, False), (1, True), (2, False), (2, True)])
def test_a_fit_starts_a_watch_across_processes_only_with_several_over_a_process_group(
    monkeypatch, world_size, group
):
    monkeypatch.setattr(dist, "is_initialized", lambda: group)
    module = _Module(world_size)
    module.on_train_start()
    assert module._loss_watch.across_processes is (world_size > 1 and group)


def test_no_checkpoint_holds_the_weights_an_unchecked_non_finite_loss_updated():
    """Across processes the newest loss waits for the next batch; a checkpoint (a stop's, a step's) checks it first,
    on every process, instead of saving the weights it updated."""
    module = DoRAModule(**MICRO_MODULE)
    module._loss_watch = LossWatch(across_processes=True)
    module._loss_watch.push(3, 0, torch.tensor(float("nan")))
    assert module._loss_watch.ready() == []  # left for the next batch
    with pytest.raises(NonFiniteLossError, match=r"the loss is nan at step 3 \(epoch 0\)"):
        module.on_save_checkpoint({})
    module._loss_watch.push(4, 0, torch.tensor(1.0))
    checkpoint: dict = {}
    module.on_save_checkpoint(checkpoint)  # a finite loss: saved as before
    assert checkpoint["dora"]["kind"] == "dora-lightning/pretrain"


def test_the_message_names_the_step_and_whose_loss():
    module = _Module(2)
    module.on_train_start()
    module._loss_watch.push(7, 1, torch.tensor(2.0))
    readings = module._loss_watch.ready(wait=True)
    module._check_losses(readings)  # finite: nothing said
    other = [type(readings[0])(7, 1, torch.tensor(2.0), 2.0, False)]
    with pytest.raises(
        NonFiniteLossError, match=r"the loss of another process is not finite at step 7 \(epoch 1\)"
    ):
        module._check_losses(other)
    own = [type(readings[0])(7, 1, torch.tensor(float("inf")), float("inf"), False)]
    with pytest.raises(
        NonFiniteLossError, match=r"the loss is inf at step 7 \(epoch 1\); lower model.base_lr"
    ):
        module._check_losses(own)


def test_one_process_reads_what_has_arrived_including_the_newest():
    watch = LossWatch()
    watch.push(0, 0, torch.tensor(1.0))
    assert [r.step for r in watch.ready()] == [0]  # on the CPU at once


TWO_PROCESS_FIT = """
import sys

import lightning.pytorch as pl
import torch

sys.path.insert(0, {tests!r})
from conftest import MICRO_MODULE  # noqa: E402

from dora_lightning.module import DoRAModule  # noqa: E402


class NanOnProcessOne(DoRAModule):
    def compute_loss(self, batch, teacher_temp):
        parts, teacher, tracked = super().compute_loss(batch, teacher_temp)
        if self.global_rank == 1 and self.global_step == 2:
            parts.total = parts.total * float("nan")
        return parts, teacher, tracked


generator = torch.Generator().manual_seed(0)
batch = {{
    "global_views": [torch.randn(2, 2, 3, 32, 32, generator=generator)],
    "local_views": [torch.randn(2, 2, 3, 16, 16, generator=generator) for _ in range(2)],
}}
trainer = pl.Trainer(
    default_root_dir={root!r}, accelerator="cpu", strategy="ddp", devices=2, max_steps=6, logger=False,
    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    use_distributed_sampler=False,
)
trainer.fit(NanOnProcessOne(**MICRO_MODULE), torch.utils.data.DataLoader([batch] * 6, batch_size=None))
"""


@pytest.mark.slow
def test_a_two_process_fit_stops_on_the_step_whose_loss_one_process_lost(tmp_path):
    """Process 1's loss alone is NaN at step 2: process 0, whose own loss was finite, stops on it too and says
    whose loss it was (before: process 1 stopped alone and process 0 waited in the gradient all-reduce until
    Lightning's launcher killed it, saying nothing)."""
    script = tmp_path / "fit.py"
    script.write_text(TWO_PROCESS_FIT.format(tests=str(REPO / "tests"), root=str(tmp_path)))
    run = subprocess.run([sys.executable, str(script)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode != 0
    assert "the loss of another process is not finite at step 2 (epoch 0)" in run.stderr, run.stderr[-3000:]
