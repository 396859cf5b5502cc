"""LossWatch across processes: the finiteness of every process's loss is all-reduced and each process reads the
losses of the batches before the newest, so all processes stop on the same non-finite step after the same batch
(one process stopping alone would leave the others in the next collective)."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_ddp import free_port

from dora_lightning.diagnostics import NonFiniteLossError, TrainingDiagnostics
from dora_lightning.loss_watch import LossWatch

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
    out = mp.Manager().dict()
    mp.spawn(watch_losses, args=(free_port(), out), nprocs=2, join=True)
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


@pytest.mark.parametrize("world_size", [1, 2])
def test_a_fit_starts_a_watch_across_processes_only_with_several(world_size):
    module = _Module(world_size)
    module.on_train_start()
    assert module._loss_watch.across_processes is (world_size > 1)


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
