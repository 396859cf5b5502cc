"""ThroughputLog: how fast a run trains and how long it waits for data, written to its loggers as it trains.

Every ``every_n_steps`` optimiser steps it writes, for the wall time since the previous write:

* ``perf/clips_per_s``: clips trained per second, all processes together;
* ``perf/steps_per_s``: optimiser steps per second;
* ``perf/data_wait_fraction``: the share of that time the training loop was blocked waiting for the loader's next
  batch (:attr:`dora_lightning.data.loader.ClipLoader.data_wait_s`): near 0 when the loader keeps up; when it is
  well above 0.05, more ``data.num_workers`` (or ``data.augment_on: gpu``) would speed the run up.

Host clocks only: nothing waits for the GPU. Over a window of many steps the host cannot run ahead of the GPU by more
than its launch queue, so the rates are the GPU's too. Lightning's own ``ThroughputMonitor`` synchronises the GPU at
every step, which this project avoids (docs/training.md, "One GPU / many GPUs").
"""

from __future__ import annotations

import time
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

__all__ = ["ThroughputLog", "clips_in"]


def clips_in(batch: Any) -> int:
    """Clips in a training batch (its views' first dimension, or its ``clip_index`` rows); 0 if it has neither."""
    if isinstance(batch, dict):
        views = batch.get("global_views")
        if views:
            return int(views[0].shape[0])
        if "clip_index" in batch:
            return int(batch["clip_index"].shape[0])
    return 0


class ThroughputLog(Callback):
    """Write ``perf/clips_per_s``, ``perf/steps_per_s`` and ``perf/data_wait_fraction`` every ``every_n_steps``
    optimiser steps (see the module docstring).

    Args:
        every_n_steps: write every this many optimiser steps; None: every ``trainer.log_every_n_steps``; 0: never.
    """

    def __init__(self, every_n_steps: int | None = None) -> None:
        if every_n_steps is not None and every_n_steps < 0:
            raise ValueError(f"throughput.every_n_steps must be >= 0 or null, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self.metrics: dict[str, float] = {}
        self._start = 0.0
        self._start_step = 0
        self._start_wait = 0.0
        self._clips = 0

    def _every(self, trainer: pl.Trainer) -> int:
        return trainer.log_every_n_steps if self.every_n_steps is None else self.every_n_steps

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._begin_window(trainer)

    def _begin_window(self, trainer: pl.Trainer) -> None:
        self._start, self._start_step = time.perf_counter(), trainer.global_step
        self._start_wait, self._clips = _data_wait(trainer) or 0.0, 0

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._clips += clips_in(batch)
        every, steps = self._every(trainer), trainer.global_step - self._start_step
        if every <= 0 or steps <= 0 or trainer.global_step % every:
            return
        seconds = max(time.perf_counter() - self._start, 1e-9)
        self.metrics = {
            "perf/clips_per_s": self._clips * trainer.world_size / seconds,
            "perf/steps_per_s": steps / seconds,
        }
        waited = _data_wait(trainer)
        if waited is not None:
            self.metrics["perf/data_wait_fraction"] = min(max(waited - self._start_wait, 0.0) / seconds, 1.0)
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(self.metrics, step=trainer.fit_loop.epoch_loop._batches_that_stepped)
        self._begin_window(trainer)


def _data_wait(trainer: pl.Trainer) -> float | None:
    """Seconds the training loop has been blocked on its loader (None for a loader that does not count them)."""
    try:
        loader = trainer.train_dataloader
    except AttributeError:
        return None
    waited = getattr(loader, "data_wait_s", None)
    return float(waited) if waited is not None else None
