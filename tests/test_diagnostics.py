"""TrainingDiagnostics' images: drawn every log_images_every_n_steps steps, once per optimiser step, on global rank
0 only (other ranks' loggers drop them, and drawing reads the tracker's masks back from the device)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from dora_lightning import diagnostics
from dora_lightning.diagnostics import TrainingDiagnostics


class _Experiment:
    def __init__(self) -> None:
        self.images: list[tuple[str, int]] = []

    def add_image(self, tag, image, step) -> None:
        self.images.append((tag, step))


class _Module(TrainingDiagnostics):
    def __init__(self, rank_zero: bool, step: int, accumulate: int = 1) -> None:
        self.hparams = SimpleNamespace(log_images_every_n_steps=2)
        self.trainer = SimpleNamespace(is_global_zero=rank_zero, accumulate_grad_batches=accumulate)
        self.experiment = _Experiment()
        self.logger = SimpleNamespace(experiment=self.experiment)
        self.global_step = step
        self._last_attention = None


@pytest.fixture
def drawn(monkeypatch):
    calls: list[int] = []
    monkeypatch.setattr(
        diagnostics, "track_grid", lambda frames, masks: calls.append(1) or torch.zeros(3, 2, 2)
    )
    return calls


@pytest.mark.parametrize(
    ("rank_zero", "step", "accumulate", "batch_idx", "expected"),
    [
        (True, 4, 1, 0, [("tracker/object_tracks", 4)]),
        (True, 3, 1, 0, []),  # not a multiple of 2
        (False, 4, 1, 0, []),  # not global rank 0
        (True, 4, 2, 8, [("tracker/object_tracks", 4)]),  # first micro-batch of the step
        (True, 4, 2, 9, []),  # its second micro-batch: the same step, already drawn
    ],
)
def test_images_are_drawn_once_per_step_on_rank_zero(drawn, rank_zero, step, accumulate, batch_idx, expected):
    module = _Module(rank_zero, step, accumulate)
    tracked = SimpleNamespace(masks=torch.zeros(1, 3, 2, 4, 4))
    module._log_images(torch.zeros(2, 3, 4, 4), tracked, batch_idx)
    assert module.experiment.images == expected
    assert len(drawn) == len(expected)
