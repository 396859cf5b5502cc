"""Schedules (DINO's per-iteration cosine_scheduler semantics) and the EMA teacher update."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from dora_lightning.core.ema import copy_params_, ema_update_
from dora_lightning.core.schedules import cosine_schedule, linear_warmup_then_constant
from dora_lightning.models.head import DINOHead

GOLDEN = Path(__file__).parent / "golden" / "dora_official_golden.npz"

# spec B at toy scale: 100 epochs x 10 iterations, lr warm-up 10 epochs from 0 to 5e-4, cosine to 1e-5
TOTAL, WARMUP = 1000, 100


@pytest.mark.parametrize(
    ("step", "expected"),
    [
        (0, 0.0),  # warm-up starts at warmup_start
        (50, 5e-4 * 50 / 99),  # numpy.linspace(0, 5e-4, 100)[50]
        (99, 5e-4),  # linspace reaches the base value on the last warm-up step
        (100, 5e-4),  # cosine starts at the base value (i = 0)
        (400, 1e-5 + 0.5 * 4.9e-4 * 1.5),  # i = 300 of 900: cos(pi/3) = 0.5 -> 3.775e-4
        (550, 2.55e-4),  # i = 450 of 900: cos(pi/2) = 0 -> midpoint
        (1000, 1e-5),  # clamped beyond the schedule
        (10_000, 1e-5),
    ],
)
def test_lr_schedule_hand_values(step, expected):
    got = cosine_schedule(step, TOTAL, 5e-4, 1e-5, warmup_steps=WARMUP, warmup_start=0.0)
    assert got == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_lr_schedule_last_step_just_above_end():
    last = cosine_schedule(TOTAL - 1, TOTAL, 5e-4, 1e-5, warmup_steps=WARMUP)
    # i = 899 of 900: 1e-5 + 2.45e-4 * (1 - cos(pi/900)) ~= 1e-5 + 1.49e-9
    assert 1e-5 < last < 1e-5 + 2e-9


@pytest.mark.parametrize(
    ("step", "expected"),
    [(0, 0.04), (250, 0.4 - 0.18 * (1 + math.sqrt(0.5))), (500, 0.22), (1000, 0.4)],
)
def test_weight_decay_schedule_hand_values(step, expected):
    assert cosine_schedule(step, TOTAL, 0.04, 0.4) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(
    ("step", "expected"),
    [(0, 0.996), (500, 0.998), (750, 1 - 0.002 * (1 - math.sqrt(0.5))), (1000, 1.0)],
)
def test_ema_momentum_schedule_hand_values(step, expected):
    assert cosine_schedule(step, TOTAL, 0.996, 1.0) == pytest.approx(expected, rel=1e-12)


def test_cosine_schedule_equals_dino_array_everywhere():
    """DINO's cosine_scheduler, written from its formula: linspace warm-up then a cosine over the remaining iterations."""
    base, final, warm_start = 5e-4, 1e-5, 1e-6
    iters = np.arange(TOTAL - WARMUP)
    dino = np.concatenate(
        [
            np.linspace(warm_start, base, WARMUP),
            final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / len(iters))),
        ]
    )
    ours = np.array([cosine_schedule(s, TOTAL, base, final, WARMUP, warm_start) for s in range(TOTAL)])
    np.testing.assert_allclose(ours, dino, rtol=1e-12, atol=0)


def test_cosine_schedule_rejects_bad_arguments():
    with pytest.raises(ValueError):
        cosine_schedule(0, 0, 1.0, 0.0)
    with pytest.raises(ValueError):
        cosine_schedule(0, 10, 1.0, 0.0, warmup_steps=11)
    with pytest.raises(ValueError):
        cosine_schedule(-1, 10, 1.0, 0.0)


def test_teacher_temperature_matches_golden_schedule():
    golden = np.load(GOLDEN)["loss_teacher_temp_schedule"]  # 0.04 -> 0.07 over 5 of 10 epochs
    ours = [linear_warmup_then_constant(e, 5, 0.04, 0.07) for e in range(len(golden))]
    np.testing.assert_allclose(ours, golden, rtol=1e-12)
    assert linear_warmup_then_constant(1, 5, 0.04, 0.07) == pytest.approx(0.0475)
    assert linear_warmup_then_constant(0, 0, 0.04, 0.07) == 0.07
    assert linear_warmup_then_constant(123, 30, 0.04, 0.04) == 0.04


def test_the_modules_teacher_temperature_is_dinos_per_epoch_schedule():
    """0.04 -> 0.07 over 5 epochs of 7 steps: constant within an epoch, the golden value of its epoch (it rose per
    step before, reaching 0.07 one epoch late)."""
    from types import SimpleNamespace

    from dora_lightning.step_schedules import StepSchedules

    class Schedules(StepSchedules):
        steps_per_epoch, total_steps, global_batch = 7, 70, 256
        hparams = SimpleNamespace(
            base_lr=5e-4, min_lr=1e-5, warmup_epochs=1, weight_decay=0.04, weight_decay_end=0.4,
            momentum_teacher=0.996, momentum_teacher_end=1.0, warmup_teacher_temp=0.04, teacher_temp=0.07,
            warmup_teacher_temp_epochs=5,
        )  # fmt: skip

    golden = np.load(GOLDEN)["loss_teacher_temp_schedule"]
    temps = [Schedules().schedule_values(step)["teacher_temp"] for step in range(70)]
    np.testing.assert_allclose(temps, np.repeat(golden, 7), rtol=1e-12)


def test_ema_update_exact_values():
    teacher = [torch.tensor([1.0, 2.0]), torch.tensor([[10.0], [-4.0]])]
    student = [torch.tensor([11.0, 22.0]), torch.tensor([[0.0], [6.0]])]
    ema_update_(teacher, student, momentum=0.9)
    torch.testing.assert_close(teacher[0], torch.tensor([2.0, 4.0]), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(teacher[1], torch.tensor([[9.0], [-3.0]]), rtol=1e-6, atol=1e-6)
    # student untouched
    assert torch.equal(student[0], torch.tensor([11.0, 22.0]))


def test_ema_update_momentum_one_keeps_teacher():
    teacher = [torch.randn(3, 4), torch.randn(5)]
    before = [t.clone() for t in teacher]
    ema_update_(teacher, [torch.randn(3, 4), torch.randn(5)], momentum=1.0)
    for t, b in zip(teacher, before, strict=True):
        assert torch.equal(t, b)


def test_ema_update_on_modules_and_errors():
    torch.manual_seed(0)
    student = DINOHead(8, out_dim=12, hidden_dim=16, bottleneck_dim=4, norm_last_layer=False)
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    expected = [0.5 * t + 0.5 * s for t, s in zip(teacher.parameters(), student.parameters(), strict=True)]
    ema_update_(list(teacher.parameters()), list(student.parameters()), momentum=0.5)
    for t, e in zip(teacher.parameters(), expected, strict=True):
        torch.testing.assert_close(t, e)
    with pytest.raises(ValueError):
        ema_update_([torch.zeros(2)], [torch.zeros(2), torch.zeros(2)], 0.9)
    with pytest.raises(ValueError):
        ema_update_([torch.zeros(2)], [torch.zeros(3)], 0.9)


def test_copy_params_copies_parameters_and_buffers():
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    teacher = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    student.train()
    student(torch.randn(8, 4) * 3 + 1)  # moves running stats away from their init
    assert not torch.equal(student[1].running_mean, teacher[1].running_mean)
    copy_params_(teacher, student)
    for (n, t), (_, s) in zip(teacher.state_dict().items(), student.state_dict().items(), strict=True):
        assert torch.equal(t, s), n
    assert teacher[0].weight.data_ptr() != student[0].weight.data_ptr()
    with pytest.raises(ValueError):
        copy_params_(nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 4)))
