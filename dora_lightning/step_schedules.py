"""The optimiser-step schedules of DoRAModule (lr, weight decay, EMA momentum, teacher temperature), from its
hyperparameters and the Trainer's step counts; evaluated once per optimiser step."""

from __future__ import annotations

import math
from typing import Any

from dora_lightning.core.schedules import cosine_schedule, linear_warmup_then_constant

__all__ = ["StepSchedules"]


class StepSchedules:
    """Mixin for a LightningModule whose hparams hold base_lr, min_lr, warmup_epochs, weight_decay(_end),
    momentum_teacher(_end), (warmup_)teacher_temp, warmup_teacher_temp_epochs and batch_size. Epoch-based settings
    are turned into optimiser steps. ``step_values`` caches one step's values in ``_step_values``."""

    _step_values: tuple[int, dict[str, float]] | None = None  # (global step, its schedule values)

    @property
    def steps_per_epoch(self) -> int:
        """Optimiser steps per epoch (the loader's batches divided by gradient accumulation)."""
        trainer = self.trainer
        batches = trainer.num_training_batches
        if not math.isfinite(batches):
            batches = trainer.estimated_stepping_batches / max(trainer.max_epochs or 1, 1)
        return max(1, math.ceil(batches / trainer.accumulate_grad_batches))

    @property
    def total_steps(self) -> int:
        return max(1, int(self.trainer.estimated_stepping_batches))

    @property
    def global_batch(self) -> int:
        """Clips per optimiser step over all processes: batch_size x processes x gradient accumulation."""
        return self.hparams.batch_size * self.trainer.world_size * self.trainer.accumulate_grad_batches

    @property
    def warmup_steps(self) -> int:
        """Optimiser steps of the lr warm-up (at most the whole run)."""
        return _warmup_steps(self.hparams, self.steps_per_epoch, self.total_steps)

    def scaled_lr(self) -> float:
        """base_lr x total batch / 256, the DINO linear scaling rule."""
        return self.hparams.base_lr * self.global_batch / 256.0

    def schedule_values(self, step: int, total_steps: int | None = None) -> dict[str, float]:
        """lr, weight decay, EMA momentum and teacher temperature at optimiser step ``step`` (of a run planned for
        ``total_steps``; None: this run's)."""
        hp, per_epoch = self.hparams, self.steps_per_epoch
        total = self.total_steps if total_steps is None else max(1, int(total_steps))
        return {
            "lr": cosine_schedule(
                step,
                total,
                self.scaled_lr(),
                hp.min_lr,
                warmup_steps=_warmup_steps(hp, per_epoch, total),
            ),
            "wd": cosine_schedule(step, total, hp.weight_decay, hp.weight_decay_end),
            "momentum": cosine_schedule(step, total, hp.momentum_teacher, hp.momentum_teacher_end),
            # per epoch, as DINO's schedule (constant within an epoch)
            "teacher_temp": linear_warmup_then_constant(
                step // per_epoch, hp.warmup_teacher_temp_epochs, hp.warmup_teacher_temp, hp.teacher_temp
            ),
        }

    def step_values(self) -> dict[str, float]:
        """:meth:`schedule_values` at the current optimiser step, evaluated once per step (training_step, the
        optimiser hooks and every micro-batch of an accumulated step share it)."""
        step = self.global_step
        if self._step_values is None or self._step_values[0] != step:
            self._step_values = (step, self.schedule_values(step))
        return self._step_values[1]


def _warmup_steps(hparams: Any, steps_per_epoch: int, total_steps: int) -> int:
    return min(hparams.warmup_epochs * steps_per_epoch, total_steps)
