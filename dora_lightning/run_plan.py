"""RunPlan: before the first step, one line that says what the run trains on and for how long.

A wrong video folder (one file of ten matched), a batch or an lr other than meant, or a run ten times longer than
planned shows in the first seconds, not after hours of rented GPU time. Process 0 writes, for configs/demo.yaml::

    dora fit: plan: DoRA, vit_tiny_patch16_224 at 64 px; 1 video, 2 min 8 s at 10 fps; an epoch is 156 steps of 8
    clips (8 x 1 process x accumulate 1) = 1,248 of its 1,250 clip starts; the run: 2 epochs = 312 steps; lr
    0.000625 (base_lr 0.02 x 8 / 256) after 156 warm-up steps; views made in the loader workers (data.augment_on
    cpu); 2 loader workers on this node's 2 usable CPU cores; checkpoints in
    /home/you/dora-lightning/runs/demo/checkpoints

(one line; a resumed run adds where it continues). Every number is the run's own: the Trainer's step counts and the
module's lr rule (:class:`~dora_lightning.step_schedules.StepSchedules`).
"""

from __future__ import annotations

import math
import os
import sys
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from dora_lightning.runs import trainer_checkpoint_folder
from dora_lightning.step_schedules import StepSchedules

__all__ = ["RunPlan", "describe_run", "format_duration", "usable_cpu_cores"]


def format_duration(seconds: float) -> str:
    """``5 s``, ``2 min 8 s``, ``1 h 32 min``: a length of video for people."""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes} min"
    return f"{minutes} min {secs} s" if minutes else f"{secs} s"


def _count(n: int, noun: str) -> str:
    """``1 step``, ``2,591 steps``."""
    return f"{n:,} {noun}{'s' * (n != 1)}"


def _rate(fps: float) -> str:
    return f"{fps:.0f}" if abs(fps - round(fps)) < 0.005 else f"{fps:.2f}"


def _videos(data: Any) -> str | None:
    videos = list(getattr(data, "videos", None) or [])
    if not videos:
        return None
    seconds = sum(video.num_frames / float(video.fps) for video in videos)
    rates = sorted({float(video.fps) for video in videos})
    fps = _rate(rates[0]) if len(rates) == 1 else f"{_rate(rates[0])}-{_rate(rates[-1])}"
    return f"{len(videos)} video{'s' * (len(videos) > 1)}, {format_duration(seconds)} at {fps} fps"


def _epoch(trainer: pl.Trainer, module: StepSchedules, data: Any) -> str:
    batch, world, accumulate = module.hparams.batch_size, trainer.world_size, trainer.accumulate_grad_batches
    text = (
        f"an epoch is {_count(module.steps_per_epoch, 'step')} of {module.global_batch:,} clips "
        f"({batch} x {world} process{'es' * (world > 1)} x accumulate {accumulate})"
    )
    batches = trainer.num_training_batches
    starts = sum(getattr(getattr(data, "dataset", None), "num_starts", None) or [])
    if starts and math.isfinite(batches):
        text += f" = {int(batches) * batch * world:,} of its {starts:,} clip starts"
    return text


def _length(trainer: pl.Trainer, module: StepSchedules) -> str:
    total, epochs = module.total_steps, trainer.max_epochs
    by_steps = trainer.max_steps not in (None, -1) and total == trainer.max_steps
    if by_steps or epochs in (None, -1):
        return f"the run: {_count(total, 'step')} (trainer.max_steps)"
    return f"the run: {_count(epochs, 'epoch')} = {_count(total, 'step')}"


def _lr(module: StepSchedules) -> str:
    hp = module.hparams
    scaled = f"lr {module.scaled_lr():.3g} (base_lr {hp.base_lr:g} x {module.global_batch} / 256)"
    return f"{scaled} after {_count(module.warmup_steps, 'warm-up step')}"


def usable_cpu_cores() -> int:
    """The CPU cores this process may run on (its affinity: a container's or a job scheduler's share), else all."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def _loader(trainer: pl.Trainer, data: Any) -> str | None:
    """How many loader workers decode on how many cores of this node; more workers than cores is said (they would
    compete for the cores instead of feeding the GPU faster)."""
    workers = getattr(data, "num_workers", None)
    if workers is None:
        return None
    if workers == 0:
        return "decoding in the training process (data.num_workers 0)"
    local = max(1, int(getattr(trainer, "num_devices", 1) or 1))
    total, cores = workers * local, usable_cpu_cores()
    text = f"{_count(workers, 'loader worker')}" + (f" x {local} processes = {total}" if local > 1 else "")
    text += f" on this node's {_count(cores, 'usable CPU core')}"
    return text + (" (more workers than cores: lower data.num_workers)" if total > cores else "")


def _replanned(trainer: pl.Trainer, module: StepSchedules) -> str:
    """A resume planned for another number of steps than the checkpoint's run (another max_epochs or max_steps):
    the schedules are recomputed for this run's length, which moves them where the run continues; said with the lr
    there, before and now."""
    planned = getattr(module, "checkpoint_planned_steps", None)
    total = module.total_steps
    if not planned or planned == total:
        return ""
    step = trainer.global_step
    before, now = module.schedule_values(step, planned)["lr"], module.schedule_values(step)["lr"]
    return (
        f" (its checkpoint's run was planned for {_count(planned, 'step')}, this one for {total:,}: the lr, weight "
        f"decay, EMA momentum and teacher temperature schedules span the new length; lr at step {step:,} "
        f"{before:.3g} -> {now:.3g})"
    )


def describe_run(trainer: pl.Trainer, module: StepSchedules, data: Any) -> str:
    """The plan of a fit that is about to start (or continue): see the module docstring."""
    hp = module.hparams
    method = {"dora": "DoRA", "dino": "DINO"}.get(hp.get("method"), str(hp.get("method", "")))
    parts = [f"{method}, {hp.get('backbone')} at {hp.get('img_size')} px"]
    if videos := _videos(data):
        parts.append(videos)
    parts += [_epoch(trainer, module, data), _length(trainer, module), _lr(module)]
    if callable(resolved := getattr(data, "resolved_augment_on", None)):
        parts.append(
            "views made in the loader workers (data.augment_on cpu)"
            if resolved() == "cpu"
            else f"views made on {module.device} after the transfer (data.augment_on gpu)"
        )
    if loader := _loader(trainer, data):
        parts.append(loader)
    folder = trainer_checkpoint_folder(trainer)
    parts.append(f"checkpoints in {folder}" if folder else "no checkpoints (checkpointing is off)")
    if trainer.global_step:
        parts.append(f"continuing after step {trainer.global_step:,}{_replanned(trainer, module)}")
    return "; ".join(parts)


class RunPlan(Callback):
    """Before the first step of a fit (process 0), one line on stderr with its plan (see the module docstring).

    Args:
        enabled: write it (``--run_plan.enabled false``: not).
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.line: str | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.enabled or not trainer.is_global_zero or not isinstance(pl_module, StepSchedules):
            return
        self.line = describe_run(trainer, pl_module, getattr(trainer, "datamodule", None))
        sys.stderr.write(f"dora fit: plan: {self.line}\n")
        sys.stderr.flush()
