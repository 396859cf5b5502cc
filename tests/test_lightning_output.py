"""What Lightning prints that is not true for a `dora` run is left out: the model summary's uncounted FLOPs (0 for
every module without ``example_input_array``) and Lightning's cloud tips; counted FLOPs and the rest are kept."""

from __future__ import annotations

import logging
import warnings

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelSummary

from dora_lightning.lightning_output import (
    LIGHTNING_INFO_LOGGERS,
    ParameterSummary,
    _DropCloudTips,
    quiet_lightning,
    use_parameter_summary,
)


class _Tiny(pl.LightningModule):
    def __init__(self, example: bool = False) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 2)
        if example:
            self.example_input_array = torch.zeros(1, 4)

    def forward(self, x):
        return self.layer(x)

    def training_step(self, batch, batch_idx):
        return self.layer(batch).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit_and_log(tmp_path, module, caplog, **trainer_args) -> str:
    trainer = pl.Trainer(
        default_root_dir=tmp_path, max_steps=1, accelerator="cpu", enable_progress_bar=False, **trainer_args
    )
    use_parameter_summary(trainer)
    with caplog.at_level(logging.INFO):
        trainer.fit(module, torch.utils.data.DataLoader(torch.zeros(2, 4), batch_size=2))
    return caplog.text


def test_the_summary_leaves_out_flops_that_were_not_counted(tmp_path, caplog):
    text = _fit_and_log(tmp_path, _Tiny(), caplog, logger=False)
    assert "Trainable params" in text and "| layer | Linear" in text
    assert "FLOPs" not in text and "Total Flops" not in text


def test_counted_flops_are_kept(tmp_path, caplog):
    text = _fit_and_log(tmp_path, _Tiny(example=True), caplog, logger=False)
    assert "FLOPs" in text and "Total Flops" in text


def test_only_lightnings_plain_summary_is_replaced():
    trainer = pl.Trainer(accelerator="cpu", logger=False, callbacks=[ModelSummary(max_depth=3)])
    use_parameter_summary(trainer)
    [summary] = [c for c in trainer.callbacks if isinstance(c, ModelSummary)]
    assert type(summary) is ParameterSummary and summary._max_depth == 3
    custom = _OwnSummary()
    trainer = pl.Trainer(accelerator="cpu", logger=False, callbacks=[custom])
    use_parameter_summary(trainer)
    assert custom in trainer.callbacks


class _OwnSummary(ModelSummary):
    """A user's own summary (as RichModelSummary is): kept."""


@pytest.fixture
def lightning_filters():
    """Lightning's info loggers without the filters of quiet_lightning (an earlier test may have run a `dora`
    command in this process), restored after the test."""
    loggers = [logging.getLogger(name) for name in LIGHTNING_INFO_LOGGERS]
    before = [list(logger.filters) for logger in loggers]
    for logger in loggers:
        logger.filters[:] = [f for f in logger.filters if not isinstance(f, _DropCloudTips)]
    yield
    for logger, filters in zip(loggers, before, strict=True):
        logger.filters[:] = filters


@pytest.mark.parametrize("quiet", [False, True])
def test_lightnings_cloud_tips_are_left_out(tmp_path, caplog, quiet, lightning_filters):
    if quiet:
        quiet_lightning()
        quiet_lightning()  # idempotent
    text = _fit_and_log(
        tmp_path, _Tiny(), caplog, logger=True
    )  # litmodels' tip: no checkpoint callback given
    assert ("litlogger" in text, "litmodels" in text) == (not quiet, not quiet)


def test_lightnings_leafspec_future_warning_is_left_out(lightning_filters):
    message = "`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec)` instead."
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_lightning()
        warnings.warn(message, FutureWarning, stacklevel=1)
        warnings.warn("another FutureWarning", FutureWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["another FutureWarning"]
