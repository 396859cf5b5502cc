"""Trainer batch limits that would cut an evaluation's data are refused: ``--trainer.limit_val_batches``,
``limit_train_batches``, ``fast_dev_run`` and ``overfit_batches`` run only the first batches of a loader, and an
evaluator's metrics (and the image counts of its results file) must describe every image of its data set (a k-NN
whose bank kept 512 of 2,000 images, 3 of 10 classes, scored 21.8 % top-1 instead of 54.2 %, silently)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import lightning.pytorch as pl

from dora_lightning.evaluation.contract import EvaluatorSettingError

__all__ = ["batches_per_process", "refuse_cut_images", "refuse_cut_loader", "refuse_cut_splits"]


def batches_per_process(items: int, batch_size: int, world_size: int) -> int:
    """Batches of the largest per-process share of ``items`` (``DistributedSampler`` and the unrepeated evaluation
    sampler both give at most ``ceil(items / world_size)`` to a process; no batch is dropped)."""
    return math.ceil(math.ceil(items / max(world_size, 1)) / batch_size)


def _limit_option(trainer: pl.Trainer, stage: str) -> str:
    """The Trainer option behind ``limit_<stage>_batches``: ``fast_dev_run`` and ``overfit_batches`` set it too."""
    if trainer.fast_dev_run:
        return f"--trainer.fast_dev_run {trainer.fast_dev_run}"
    if trainer.overfit_batches > 0:
        return f"--trainer.overfit_batches {trainer.overfit_batches}"
    return f"--trainer.limit_{stage}_batches {getattr(trainer, f'limit_{stage}_batches')}"


def refuse_cut_loader(
    trainer: pl.Trainer,
    stage: Literal["train", "val"],
    batches: int,
    what: str,
    remedy: str = "evaluate a smaller data set (--evaluator.data_dir)",
) -> None:
    """Raise :class:`~dora_lightning.evaluation.contract.EvaluatorSettingError` when the Trainer's batch limit for
    ``stage`` would run fewer than the ``batches`` (per process) of the loader of ``what``: an evaluator's results
    (and the image counts of its results file) describe every image of its data, never a cut loader."""
    limit = getattr(trainer, f"limit_{stage}_batches")
    kept = min(batches, limit) if isinstance(limit, int) else int(batches * limit)
    if kept < batches:
        raise EvaluatorSettingError(
            f"{_limit_option(trainer, stage)} would run {kept} of the {batches} batches (per process) of {what}, "
            f"and the results would not be those of the data set; remove the limit, or {remedy}"
        )


def refuse_cut_images(
    trainer: pl.Trainer, batch_size: int, loaders: Sequence[tuple[Literal["train", "val"], int, str]]
) -> None:
    """:func:`refuse_cut_loader` for each ``(stage, number of images, what)`` of an evaluation's image loaders
    (``batch_size`` images per batch and process, sharded over the Trainer's processes)."""
    for stage, images, what in loaders:
        refuse_cut_loader(trainer, stage, batches_per_process(images, batch_size, trainer.world_size), what)


def refuse_cut_splits(trainer: pl.Trainer, batch_size: int, train_images: int, val_images: int) -> None:
    """:func:`refuse_cut_images` for a probe that trains on ``train_images`` (``trainer.fit``) and validates on
    ``val_images``."""
    refuse_cut_images(
        trainer,
        batch_size,
        [
            ("train", train_images, f"the {train_images} training images"),
            ("val", val_images, f"the {val_images} validation images"),
        ],
    )
