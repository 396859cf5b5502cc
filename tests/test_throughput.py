"""ThroughputLog: clips/s, steps/s and the share of time the loop waited for the loader, written every N steps."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import Logger
from test_module import MICRO, clip_video, make_data, make_trainer  # noqa: F401 - clip_video is a fixture

from dora_lightning.module import DoRAModule
from dora_lightning.throughput import ThroughputLog, clips_in


class Recorded(Logger):
    """A logger that keeps what it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[int, dict]] = []

    name, version = "recorded", 0

    def log_metrics(self, metrics, step=None) -> None:
        self.rows.append((step, dict(metrics)))

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass


class SlowClips:
    """Wraps a transform so each clip costs ``seconds`` more in the loader."""

    def __init__(self, transform, seconds: float) -> None:
        self.transform, self.seconds = transform, seconds

    def __getattr__(self, name):
        return getattr(self.transform, name)

    def __call__(self, clip, generator):
        import time

        time.sleep(self.seconds)
        return self.transform(clip, generator)


def run(root: Path, video: Path, slow: float = 0.0) -> list[tuple[int, dict]]:
    pl.seed_everything(0)
    data = make_data(video)
    if slow:
        data.transform = SlowClips(data.transform, slow)
    logger = Recorded()
    trainer = make_trainer(root, 4, logger=logger, callbacks=[ThroughputLog(every_n_steps=2)])
    trainer.fit(DoRAModule(**MICRO), datamodule=data)
    return [(step, m) for step, m in logger.rows if any(k.startswith("perf/") for k in m)]


def test_rates_are_written_every_n_steps(tmp_path, clip_video):  # noqa: F811
    rows = run(tmp_path, clip_video)
    assert [step for step, _ in rows] == [1, 3]  # Lightning's logging step of optimiser steps 2 and 4
    for _, metrics in rows:
        assert set(metrics) == {"perf/clips_per_s", "perf/steps_per_s", "perf/data_wait_fraction"}
        assert metrics["perf/clips_per_s"] == pytest.approx(2 * metrics["perf/steps_per_s"])  # 2 clips a step
        assert 0.0 <= metrics["perf/data_wait_fraction"] <= 1.0


def test_a_slow_loader_shows_as_waiting(tmp_path, clip_video):  # noqa: F811
    """0.3 s of extra loader work per clip in the training process (no workers): the loop waits at least the 0.6 s
    slept per step of 2 clips (wait fraction / steps per second = seconds waited per step, whatever else the machine
    runs: a fixed fraction of the time failed when another test process slowed the steps)."""
    rows = run(tmp_path, clip_video, slow=0.3)
    assert rows and all(
        m["perf/data_wait_fraction"] / m["perf/steps_per_s"] >= 0.6 * 0.99 for _, m in rows
    ), rows


def test_clips_in_counts_views_or_clip_rows():
    assert clips_in({"global_views": [torch.zeros(5, 2, 3, 8, 8)]}) == 5
    assert clips_in({"frames": torch.zeros(3, 2, 8, 8, 3), "clip_index": torch.zeros(3, 2)}) == 3
    assert clips_in([torch.zeros(2)]) == 0


def test_negative_every_n_steps_is_refused():
    with pytest.raises(ValueError, match="throughput.every_n_steps must be >= 0"):
        ThroughputLog(every_n_steps=-1)
