"""What Lightning prints in a `dora` run that is not true, or says nothing to this run's user, left out.

* The model summary's FLOPs: Lightning counts them only by running the model on ``example_input_array``, which the
  pretraining module has not got (its step takes views of several sizes), so every ``dora fit`` printed ``FLOPs 0``
  for each module and ``0 Total Flops``: a count that was never made. :class:`ParameterSummary` prints Lightning's
  summary without the FLOPs when none were counted (with them when they were). Lightning's rich summary, its
  default when the ``rich`` package is installed (not a dependency here), is kept as it is, FLOPs column included.
* The tips to install ``litlogger`` and ``litmodels`` (Lightning's cloud services), printed by every Trainer (the
  second when no checkpoint callback is configured).
* torch's FutureWarning about ``isinstance(treespec, LeafSpec)``, raised by Lightning 2.6's own pytree code at the
  first batch: nothing a user of Lightning can act on.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelSummary
from lightning.pytorch.callbacks.model_summary import log as summary_log
from lightning.pytorch.utilities.model_summary.model_summary import _format_summary_table

__all__ = ["ParameterSummary", "quiet_lightning", "use_parameter_summary"]

FLOPS_COLUMN = "FLOPs"
FLOPS_TOTAL = "Total Flops"
CLOUD_TIPS = "💡 Tip: For seamless cloud"  # "... logging" (litlogger), "... uploads" (litmodels)
LEAFSPEC_WARNING = r"`isinstance\(treespec, LeafSpec\)` is deprecated"
# where Lightning's rank_zero_info goes (the one of the two that lightning_utilities was handed last)
LIGHTNING_INFO_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")


class ParameterSummary(ModelSummary):
    """Lightning's model summary (:class:`~lightning.pytorch.callbacks.ModelSummary`) without the FLOPs column and
    total when no FLOPs were counted (a module without ``example_input_array``)."""

    @staticmethod
    def summarize(
        summary_data: list[tuple[str, list[str]]],
        total_parameters: int,
        trainable_parameters: int,
        model_size: float,
        total_training_modes: dict[str, int],
        total_flops: int,
        **summarize_kwargs: Any,
    ) -> None:
        columns = summary_data if total_flops else [c for c in summary_data if c[0] != FLOPS_COLUMN]
        table = _format_summary_table(
            total_parameters, trainable_parameters, model_size, total_training_modes, total_flops, *columns
        )
        if not total_flops:
            table = "\n".join(line for line in table.splitlines() if not line.endswith(FLOPS_TOTAL))
        summary_log.info("\n" + table)


def use_parameter_summary(trainer: pl.Trainer) -> None:
    """Put :class:`ParameterSummary` in place of the trainer's default summary (Lightning's plain
    :class:`~lightning.pytorch.callbacks.ModelSummary`, with its ``max_depth``); a rich or custom summary is kept."""
    trainer.callbacks = [
        ParameterSummary(callback._max_depth, **callback._summarize_kwargs)
        if type(callback) is ModelSummary
        else callback
        for callback in trainer.callbacks
    ]


class _DropCloudTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(CLOUD_TIPS)


def quiet_lightning() -> None:
    """Leave out Lightning's cloud tips and the LeafSpec FutureWarning for the rest of this process (the `dora`
    command and ``python -m dora_lightning.compare`` call it). Idempotent."""
    for name in LIGHTNING_INFO_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropCloudTips) for f in logger.filters):
            logger.addFilter(_DropCloudTips())
    warnings.filterwarnings("ignore", message=LEAFSPEC_WARNING, category=FutureWarning)
