"""The training diagnostics DoRAModule writes every N steps straight to its loggers (not through ``self.log``).

Schedule values and the tracker's mask areas are not needed by any callback, and logging them with ``self.log`` at
every step costs a host-to-device copy per Python number (which waits for the GPU) and keeps stale values in
Lightning's results; writing them to the loggers every ``N`` steps costs one device read per ``N`` steps.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch.distributed as dist
from lightning.pytorch.loggers import Logger
from torch import Tensor

from dora_lightning.core.tracker import TrackerOutput
from dora_lightning.loss_watch import LossReading, LossWatch
from dora_lightning.pictures import attention_grid, track_grid

__all__ = ["NonFiniteLossError", "TrainingDiagnostics", "diagnostics_due", "write_diagnostics"]


def diagnostics_due(step: int, every: int) -> bool:
    """Whether optimiser step ``step`` writes diagnostics when they are written every ``every`` steps (0: never)."""
    return every > 0 and step % every == 0


def write_diagnostics(
    loggers: Iterable[Logger], step: int, schedule: Mapping[str, float], masks: Tensor | None
) -> None:
    """Write ``train/<name>`` for each schedule value and, given the tracker's masks (B, k, T, H, W),
    ``tracker/mask_area_obj{i}`` (fraction of pixels object i's masks keep) to every logger at ``step``."""
    metrics = {f"train/{name}": float(value) for name, value in schedule.items()}
    if masks is not None:
        areas = masks.float().mean(dim=(0, 2, 3, 4)).tolist()  # the one device read of these steps
        metrics.update({f"tracker/mask_area_obj{i}": area for i, area in enumerate(areas)})
    for logger in loggers:
        logger.log_metrics(metrics, step=step)


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; the message names the step."""


class TrainingDiagnostics:
    """What DoRAModule reports besides the loss (a mixin of the LightningModule): the finiteness of the losses as
    they reach the host, the diagnostics every ``diagnostics_every_n_steps`` steps, and the tracker images every
    ``log_images_every_n_steps`` steps. Expects ``hparams``, ``trainer``, ``loggers``, ``logger``, ``global_step``,
    ``_loss_watch`` and ``_last_attention`` on the module."""

    hparams: Any
    trainer: Any
    global_step: int

    def _check_losses(self, readings: list[LossReading]) -> None:
        for reading in readings:
            if not reading.finite:
                where = f"at step {reading.step} (epoch {reading.epoch})"
                what = (
                    f"the loss of another process is not finite {where} (this process's: {reading.value})"
                    if math.isfinite(reading.value)
                    else f"the loss is {reading.value} {where}"
                )
                raise NonFiniteLossError(
                    f"{what}; lower model.base_lr, use precision bf16-mixed rather than 16-mixed, or check the data"
                )

    def _diagnostics_every(self) -> int:
        every = self.hparams.get("diagnostics_every_n_steps")
        return self.trainer.log_every_n_steps if every is None else every

    def _reports_at(self, batch_idx: int) -> bool:
        """Whether this batch reports (diagnostics, images): on global rank 0, the first micro-batch of an optimiser
        step (the other ranks' loggers drop what they are given, and drawing or reading values costs a device read)."""
        return self.trainer.is_global_zero and batch_idx % self.trainer.accumulate_grad_batches == 0

    def _write_diagnostics(
        self, values: dict[str, float], tracked: TrackerOutput | None, batch_idx: int
    ) -> None:
        """Every ``diagnostics_every_n_steps`` optimiser steps, where :meth:`_reports_at`, with loggers."""
        if not self.loggers or not self._reports_at(batch_idx):
            return
        if diagnostics_due(self.global_step, self._diagnostics_every()):
            write_diagnostics(
                self.loggers, self.global_step, values, tracked.masks if tracked is not None else None
            )

    def on_train_start(self) -> None:
        """A fresh loss watch: across the processes of a multi-process run over torch.distributed (they stop on the
        same step together)."""
        distributed = dist.is_available() and dist.is_initialized()
        self._loss_watch = LossWatch(across_processes=self.trainer.world_size > 1 and distributed)
        self._step_values = None

    def on_train_epoch_end(self) -> None:
        self._check_losses(self._loss_watch.ready(wait=True))

    def on_train_end(self) -> None:
        self._check_losses(self._loss_watch.ready(wait=True))

    def _log_images(self, frames: Tensor, tracked: TrackerOutput, batch_idx: int) -> None:
        """Every ``log_images_every_n_steps`` steps, where :meth:`_reports_at`: one clip's object tracks and its
        frame-0 attention per head."""
        every = self.hparams.log_images_every_n_steps
        if not every or self.global_step % every or not self._reports_at(batch_idx):
            return
        experiment = getattr(self.logger, "experiment", None)
        if not hasattr(experiment, "add_image"):
            return
        experiment.add_image("tracker/object_tracks", track_grid(frames, tracked.masks[0]), self.global_step)
        if self._last_attention is not None:
            attention, grid = self._last_attention
            experiment.add_image(
                "attention/frame0_heads", attention_grid(frames[0], attention, grid), self.global_step
            )
