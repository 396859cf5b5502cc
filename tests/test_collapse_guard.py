"""CollapseGuard on a micro DoRAModule: healthy runs stay quiet, each kind of collapse is named once, stop ends cleanly."""

from __future__ import annotations

import logging
import math
from types import SimpleNamespace
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import MICRO_MODULE, REPO
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import Logger
from torch.utils.data import DataLoader

from dora_lightning.collapse_guard import CollapseGuard
from dora_lightning.module import DoRAModule

MICRO = MICRO_MODULE | dict(warmup_epochs=1, batch_size=8)
FROZEN_TEACHER = dict(
    momentum_teacher=1.0, momentum_teacher_end=1.0
)  # the EMA leaves the teacher as we set it
GUARD_LOG = "dora_lightning.collapse_guard"


def fake_batches(count: int, clips: int = 8, frames: int = 2, seed: int = 0) -> list[dict[str, Any]]:
    """Normalised DoRA batches of smooth random images: one 32 px global view and two 16 px local views per frame."""
    generator = torch.Generator().manual_seed(seed)

    def views(size: int) -> torch.Tensor:
        coarse = torch.rand(clips * frames, 3, 4, 4, generator=generator)
        images = F.interpolate(coarse, size=size, mode="bilinear", align_corners=False)
        return ((images - 0.5) / 0.25).unflatten(0, (clips, frames))

    return [{"global_views": [views(32)], "local_views": [views(16), views(16)]} for _ in range(count)]


class RecordingLogger(Logger):
    """Keeps every ``log_metrics`` call as ``(step, metrics)``."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[tuple[int, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.records.append((int(step or 0), dict(metrics)))


def fit(
    module: DoRAModule,
    guard: CollapseGuard,
    steps: int,
    tmp_path,
    batches: list[dict[str, Any]] | None = None,
    callbacks: tuple[Callback, ...] = (),
    ckpt_path: str | None = None,
    **trainer_kw: Any,
) -> pl.Trainer:
    options = dict(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
        callbacks=[guard, *callbacks],
    )
    trainer = pl.Trainer(**(options | trainer_kw))
    loader = DataLoader(batches if batches is not None else fake_batches(steps), batch_size=None)
    trainer.fit(module, train_dataloaders=loader, ckpt_path=ckpt_path)
    return trainer


def uniform_module(**extra: Any) -> DoRAModule:
    """A teacher whose head outputs 0 for every input: a uniform distribution, entropy exactly log(out_dim)."""
    pl.seed_everything(0)
    module = DoRAModule(**(MICRO | FROZEN_TEACHER | extra))
    module.teacher.head.weight_g.data.zero_()
    return module


def guard_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == GUARD_LOG and r.levelno >= logging.WARNING]


class ModeRecorder(Callback):
    """After each batch (so after the guard's check): is the teacher backbone still in training mode everywhere?"""

    def __init__(self) -> None:
        self.modes: list[bool] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.modes.append(all(m.training for m in pl_module.teacher.backbone.modules()))


def test_healthy_run_logs_the_measures_and_stays_quiet(tmp_path, caplog):
    pl.seed_everything(0)
    module = DoRAModule(**MICRO)
    guard = CollapseGuard(every_n_steps=2, patience=1)
    logger, modes = RecordingLogger(), ModeRecorder()
    fit(module, guard, 6, tmp_path, logger=logger, log_every_n_steps=1, callbacks=(modes,))
    assert guard_lines(caplog) == []
    entropy = {step: m["train/teacher_entropy"] for step, m in logger.records if "train/teacher_entropy" in m}
    checks = {step: m for step, m in logger.records if "collapse/feature_rank" in m}
    # Lightning logs the train/* metrics of the batch that makes optimiser step N at step N - 1; the checks follow
    assert sorted(checks) == [1, 3, 5], "one check every 2 optimiser steps, at the step of its batch"
    for step, metrics in checks.items():
        assert metrics["collapse/entropy_ratio"] == pytest.approx(
            entropy[step] / math.log(MICRO["out_dim"]), rel=1e-5
        )
        assert 0.05 < metrics["collapse/entropy_ratio"] < 0.97
        assert 2.0 < metrics["collapse/feature_rank"] <= 16.0
        assert metrics["collapse/feature_rank_ratio"] > 0.9
    # the probe: frame 0 of all 8 clips then frame 1 of all 8, as normalised, on the module's device
    first = fake_batches(1)[0]["global_views"][0]
    assert guard.probe is None, "the probe is dropped when training ends"
    assert guard.start_rank is not None and guard.start_probe_size == 16
    assert modes.modes and all(modes.modes), "the check left the teacher backbone in eval mode"
    probe_guard = CollapseGuard()
    probe_guard._take_probe({"global_views": [first]})
    assert torch.equal(probe_guard.probe[:8], first[:, 0]) and torch.equal(probe_guard.probe[8:], first[:, 1])


def test_uniform_teacher_warns_once_naming_the_step(tmp_path, caplog):
    module = uniform_module()
    guard = CollapseGuard(every_n_steps=2, patience=2)
    trainer = fit(module, guard, 8, tmp_path)
    lines = guard_lines(caplog)
    assert len(lines) == 1, lines  # checks at 2, 4, 6, 8: the streak reaches 2 at step 4, then no repeat
    line = lines[0]
    assert "uniform teacher collapse at step 4" in line
    assert "1.000 x log(out_dim=64)" in line and "above 0.97" in line
    assert "data." in line and "model.base_lr" in line and "docs/troubleshooting.md#collapse" in line
    assert "\n" not in line
    assert trainer.global_step == 8, "without stop the run goes on"
    assert guard.metrics["collapse/entropy_ratio"] == pytest.approx(1.0, abs=1e-5)


def test_stop_ends_the_run_at_the_check_and_keeps_checkpoints(tmp_path, caplog):
    module = uniform_module()
    guard = CollapseGuard(every_n_steps=2, patience=2, stop=True)
    saver = ModelCheckpoint(
        dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1, filename="{step}"
    )
    trainer = fit(module, guard, 20, tmp_path, enable_checkpointing=True, callbacks=(saver,))
    assert trainer.global_step == 4 and trainer.should_stop
    (line,) = guard_lines(caplog)
    assert "uniform teacher collapse at step 4" in line and "stopping the run" in line
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["step=2.ckpt", "step=4.ckpt"]


def test_one_hot_teacher_warns(tmp_path, caplog):
    # a far too sharp teacher temperature: each output puts all its mass on one prototype
    pl.seed_everything(0)
    module = DoRAModule(**(MICRO | FROZEN_TEACHER | dict(teacher_temp=1e-4, warmup_teacher_temp=1e-4)))
    guard = CollapseGuard(every_n_steps=2, patience=2)
    fit(module, guard, 6, tmp_path)
    (line,) = guard_lines(caplog)
    assert "one-hot teacher collapse at step 4" in line and "below 0.05" in line
    assert guard.streaks["one-hot"] == 3 and guard.streaks["uniform"] == 0


class FlattenFeatures(Callback):
    """From optimiser step ``at`` on, every teacher CLS feature equals one fixed vector (final norm weight 0)."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.at:
            norm = pl_module.teacher.backbone.norm
            norm.weight.data.zero_()
            norm.bias.data.copy_(torch.linspace(-1.0, 1.0, norm.bias.numel()))


def test_feature_rank_drop_warns(tmp_path, caplog):
    pl.seed_everything(0)
    module = DoRAModule(**(MICRO | FROZEN_TEACHER))
    guard = CollapseGuard(every_n_steps=2, patience=100, min_rank_ratio=0.5)
    fit(module, guard, 6, tmp_path, callbacks=(FlattenFeatures(at=2),))
    (line,) = guard_lines(caplog)
    assert "feature rank collapse at step 4" in line and "below min_rank_ratio 0.5" in line
    assert guard.start_rank > 3.0
    assert "effective rank of the teacher's CLS features 1 " in line


def test_every_n_steps_zero_turns_it_off(tmp_path, caplog):
    module = uniform_module()
    guard = CollapseGuard(every_n_steps=0, patience=1)
    fit(module, guard, 4, tmp_path)
    assert guard_lines(caplog) == []
    assert guard.metrics == {} and guard.start_rank is None and guard.probe is None


def test_checkpoint_keeps_the_start_rank_not_the_probe_and_resume_goes_on(tmp_path, caplog):
    pl.seed_everything(0)
    module = DoRAModule(**(MICRO | FROZEN_TEACHER))
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, filename="{step}")
    guard = CollapseGuard(every_n_steps=2)
    fit(module, guard, 4, tmp_path, enable_checkpointing=True, callbacks=(saver,))
    checkpoint = torch.load(tmp_path / "ckpt" / "step=4.ckpt", weights_only=False)
    (state,) = [v for k, v in checkpoint["callbacks"].items() if k.startswith("CollapseGuard")]
    assert state["start_rank"] == pytest.approx(guard.start_rank) and state["start_probe_size"] == 16
    assert state["last_checked_step"] == 4
    assert not any(isinstance(v, torch.Tensor) for v in state.values()), "the probe batch is not saved"

    # resume on other clips: the new probe is taken from them, the start rank is the saved one (not re-measured)
    resumed_guard = CollapseGuard(every_n_steps=2)
    fresh_rank_guard = CollapseGuard(every_n_steps=2)
    other = fake_batches(8, seed=1)
    resumed = DoRAModule(**(MICRO | FROZEN_TEACHER))
    trainer = fit(resumed, resumed_guard, 8, tmp_path, batches=other, ckpt_path=str(saver.best_model_path))
    assert trainer.global_step == 8
    assert resumed_guard.start_rank == pytest.approx(state["start_rank"])
    fresh_rank_guard._take_probe(other[0])
    assert fresh_rank_guard.feature_rank(resumed) != pytest.approx(state["start_rank"]), "probe batches alike"
    assert resumed_guard.last_checked_step == 8
    assert "collapse/feature_rank_ratio" in resumed_guard.metrics
    assert guard_lines(caplog) == []


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(every_n_steps=-1),
        dict(min_entropy_ratio=0.5, max_entropy_ratio=0.4),
        dict(patience=0),
        dict(min_rank_ratio=1.5),
        dict(probe_size=1),
    ],
)
def test_bad_options_are_refused(kwargs):
    with pytest.raises(ValueError, match="collapse_guard"):
        CollapseGuard(**kwargs)


def test_dora_fit_has_the_guard_on_by_default(capsys, monkeypatch):
    from dora_lightning.cli import DoraCLI, main
    from dora_lightning.data.datamodule import VideoClipDataModule

    monkeypatch.chdir(REPO)
    base = ["--data.paths", "assets/video/vtest.mp4"]
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *base, "--print_config"])
    assert exit_info.value.code in (0, None)
    assert yaml.safe_load(capsys.readouterr().out)["collapse_guard"] == dict(
        every_n_steps=20,
        max_entropy_ratio=0.97,
        min_entropy_ratio=0.05,
        patience=3,
        min_rank_ratio=0.25,
        probe_size=64,
        stop=False,
    )
    micro = [f"--model.{key}={value}" for key, value in MICRO_MODULE.items()]
    options = ["--collapse_guard.stop", "true", "--collapse_guard.every_n_steps", "50"]
    cli = DoraCLI(DoRAModule, VideoClipDataModule, run=False, args=[*base, *micro, *options])
    (guard,) = [c for c in cli.trainer.callbacks if isinstance(c, CollapseGuard)]
    assert guard.stop is True and guard.every_n_steps == 50


def test_entropy_must_stay_out_of_range_for_consecutive_checks(caplog):
    """A check back in range resets the count: patience 3 over ratios hi, hi, ok, hi, hi, hi warns at the 6th check."""
    pl.seed_everything(0)
    module = DoRAModule(**MICRO)
    guard = CollapseGuard(every_n_steps=1, patience=3)
    guard._take_probe(fake_batches(1)[0])
    guard.start_rank = guard.feature_rank(module)
    log_k = math.log(MICRO["out_dim"])
    trainer = SimpleNamespace(callback_metrics={}, loggers=[])
    found = []
    for step, ratio in enumerate([0.99, 0.99, 0.5, 0.99, 0.99, 0.99], start=1):
        trainer.callback_metrics["train/teacher_entropy"] = torch.tensor(ratio * log_k)
        found.append(guard.check(trainer, module, step))
        assert guard.metrics["collapse/entropy_ratio"] == pytest.approx(ratio, rel=1e-6)
    assert found == [False] * 5 + [True]
    (line,) = guard_lines(caplog)
    assert "uniform teacher collapse at step 6" in line and "0.990 x log(out_dim=64)" in line


def test_one_check_per_optimiser_step_with_gradient_accumulation(tmp_path):
    """accumulate_grad_batches=2: 8 batches make 4 optimiser steps; every 2 steps = checks at steps 2 and 4 only."""
    pl.seed_everything(0)
    module = DoRAModule(**MICRO)
    guard = CollapseGuard(every_n_steps=2)
    logger = RecordingLogger()
    fit(module, guard, 4, tmp_path, batches=fake_batches(8), logger=logger, accumulate_grad_batches=2)
    checks = [step for step, metrics in logger.records if "collapse/feature_rank" in metrics]
    assert checks == [1, 3] and guard.last_checked_step == 4
