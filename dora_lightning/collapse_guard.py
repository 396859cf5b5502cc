"""CollapseGuard: a callback that watches pretraining for collapse and says so (or stops the run) in one line.

Self-distillation collapses in two ways (DINO, section 5.3): the teacher output becomes uniform (its entropy rises to
log(out_dim)) or one-hot (its entropy falls to 0); either way the features stop telling inputs apart, which the
effective rank of the teacher's CLS features on a fixed batch of frames shows directly. Every ``every_n_steps``
optimiser steps the guard

* reads the teacher entropy DoRAModule logs each step (``train/teacher_entropy``) and logs
  ``collapse/entropy_ratio`` = entropy / log(out_dim) (to the trainer's loggers, at the step of that batch's
  ``train/*`` metrics; the last check's values are also in :attr:`CollapseGuard.metrics`);
* measures the effective rank (RankMe, :func:`dora_lightning.collapse.effective_rank`) of the teacher backbone's CLS
  features on a probe batch kept from the first training batch and logs ``collapse/feature_rank`` and
  ``collapse/feature_rank_ratio`` (the rank divided by the rank at the start of the run);
* warns once per kind of collapse (a single line, rank zero only) when the entropy ratio stays above
  ``max_entropy_ratio`` (uniform teacher) or below ``min_entropy_ratio`` (one-hot teacher) for ``patience``
  consecutive checks, or when the rank ratio falls under ``min_rank_ratio`` (feature rank); with ``stop=True`` it
  ends the run cleanly instead (``trainer.should_stop``; checkpoints already written are kept).

``dora fit`` adds the guard by default (options ``--collapse_guard.*``); ``every_n_steps: 0`` turns it off. See
docs/troubleshooting.md#collapse and docs/training.md.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor

from dora_lightning.collapse import effective_rank, uniform_entropy

__all__ = ["DOC_SECTION", "ENTROPY_METRIC", "CollapseGuard"]

log = logging.getLogger(__name__)

ENTROPY_METRIC = "train/teacher_entropy"
DOC_SECTION = "docs/troubleshooting.md#collapse"
_CAUSES = (
    "Usual causes: batches of near-identical clips (data diversity: more or longer videos in data.paths, data.cursors "
    "at least 2 x data.batch_size, a larger data.frame_stride), a learning rate too high (model.base_lr) or a small "
    "batch (data.batch_size)"
)


class CollapseGuard(Callback):
    """Warns (or stops the run) when the teacher collapses: uniform or one-hot output, or a feature-rank drop.

    Args:
        every_n_steps: check every this many optimiser steps (0 disables the guard: no probe, no metrics, no checks).
        max_entropy_ratio: teacher entropy / log(out_dim) above this for ``patience`` checks = uniform teacher.
        min_entropy_ratio: teacher entropy / log(out_dim) below this for ``patience`` checks = one-hot teacher.
        patience: consecutive checks the entropy ratio must stay out of range before the guard acts.
        min_rank_ratio: feature rank / feature rank at the start below this (at one check) = feature-rank collapse.
        probe_size: at most this many images in the probe batch: the first frame of every clip of the first
            training batch's first global view, then their second frames, and so on.
        stop: end the run (``trainer.should_stop = True``) at the first collapse instead of only warning.

    The probe batch lives on the training device and is not saved in checkpoints; the start rank, the probe size and
    the entropy streaks are (:meth:`state_dict`). After a resume a new probe is taken from the first batch and
    compared with the start rank of the original run (the rank of another batch of the same size and kind: a close
    estimate, far inside the factor ``min_rank_ratio`` allows); with another probe size the start rank is measured
    again.
    """

    def __init__(
        self,
        every_n_steps: int = 20,
        max_entropy_ratio: float = 0.97,
        min_entropy_ratio: float = 0.05,
        patience: int = 3,
        min_rank_ratio: float = 0.25,
        probe_size: int = 64,
        stop: bool = False,
    ) -> None:
        if every_n_steps < 0:
            raise ValueError(
                f"collapse_guard.every_n_steps must be >= 0 (0 disables the guard), got {every_n_steps}"
            )
        if not 0.0 <= min_entropy_ratio < max_entropy_ratio <= 1.0:
            raise ValueError(
                "collapse_guard needs 0 <= min_entropy_ratio < max_entropy_ratio <= 1, got "
                f"min_entropy_ratio={min_entropy_ratio}, max_entropy_ratio={max_entropy_ratio}"
            )
        if patience < 1:
            raise ValueError(f"collapse_guard.patience must be >= 1, got {patience}")
        if not 0.0 <= min_rank_ratio <= 1.0:
            raise ValueError(f"collapse_guard.min_rank_ratio must be in [0, 1], got {min_rank_ratio}")
        if probe_size < 2:
            raise ValueError(
                f"collapse_guard.probe_size must be >= 2 (a rank needs two images), got {probe_size}"
            )
        self.every_n_steps = every_n_steps
        self.max_entropy_ratio = max_entropy_ratio
        self.min_entropy_ratio = min_entropy_ratio
        self.patience = patience
        self.min_rank_ratio = min_rank_ratio
        self.probe_size = probe_size
        self.stop = stop
        self.probe: Tensor | None = None
        self.start_rank: float | None = None
        self.start_probe_size: int | None = None
        self.streaks = {"uniform": 0, "one-hot": 0}
        self.warned: set[str] = set()
        self.last_checked_step = -1
        self.metrics: dict[str, float] = {}  # the measures of the last check

    @property
    def enabled(self) -> bool:
        return self.every_n_steps > 0

    # ------------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "start_rank": self.start_rank,
            "start_probe_size": self.start_probe_size,
            "streaks": dict(self.streaks),
            "last_checked_step": self.last_checked_step,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.start_rank = state_dict.get("start_rank")
        self.start_probe_size = state_dict.get("start_probe_size")
        self.streaks.update(state_dict.get("streaks", {}))
        self.last_checked_step = int(state_dict.get("last_checked_step", -1))

    # ------------------------------------------------------------------------------------------------ measures
    @torch.no_grad()
    def feature_rank(self, pl_module: pl.LightningModule) -> float:
        """Effective rank of the teacher backbone's (final-normed) CLS features of the probe batch, in eval mode."""
        from dora_lightning.models.backbone import forward_features

        assert self.probe is not None
        backbone = pl_module.teacher.backbone
        modes = [(m, m.training) for m in backbone.modules()]
        backbone.eval()
        try:
            cls, _ = forward_features(backbone, self.probe)
        finally:
            for module, training in modes:
                module.training = training
        return effective_rank(cls.float().cpu())

    def _take_probe(self, batch: dict[str, Any]) -> None:
        views = batch["global_views"][0]  # (B, T, 3, H, W), normalised
        frames = views.detach().transpose(0, 1).flatten(0, 1)  # frame 0 of every clip, then frame 1, ...
        self.probe = frames[: self.probe_size].clone()

    # ------------------------------------------------------------------------------------------------ hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """A new fit starts afresh (a resume then loads the saved state: Lightning restores it after ``setup``)."""
        if stage == "fit":
            self.probe, self.start_rank, self.start_probe_size = None, None, None
            self.streaks = {"uniform": 0, "one-hot": 0}
            self.warned, self.last_checked_step, self.metrics = set(), -1, {}

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if not self.enabled or self.probe is not None:
            return
        self._take_probe(batch)
        assert self.probe is not None
        if self.probe.shape[0] < 2:
            self.every_n_steps = 0
            self._emit(
                "collapse guard off: the probe batch holds one image (one clip of one frame); the feature rank needs "
                "at least two"
            )
            return
        if self.start_rank is None or self.start_probe_size != self.probe.shape[0]:
            self.start_rank = self.feature_rank(pl_module)
            self.start_probe_size = int(self.probe.shape[0])

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if not self.enabled or self.probe is None or step == 0 or step % self.every_n_steps:
            return
        if step == self.last_checked_step:  # gradient accumulation: batches between optimiser steps
            return
        self.last_checked_step = step
        collapsed = self.check(trainer, pl_module, step)
        if self.stop:
            collapsed = trainer.strategy.reduce_boolean_decision(collapsed, all=False)
            if collapsed:
                trainer.should_stop = True

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.probe = None  # a later fit takes a new one

    # ------------------------------------------------------------------------------------------------ the check
    def check(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> bool:
        """Measure, log and judge at optimiser step ``step``; True when a collapse was found at this check."""
        found: list[str] = []
        metrics: dict[str, float] = {}
        out_dim = int(pl_module.hparams.get("out_dim", 0) or 0)
        entropy = trainer.callback_metrics.get(ENTROPY_METRIC)
        if entropy is not None and out_dim > 1:
            value = float(entropy)
            ratio = value / uniform_entropy(out_dim)
            metrics["collapse/entropy_ratio"] = ratio
            self.streaks["uniform"] = self.streaks["uniform"] + 1 if ratio > self.max_entropy_ratio else 0
            self.streaks["one-hot"] = self.streaks["one-hot"] + 1 if ratio < self.min_entropy_ratio else 0
            detail = f"teacher entropy {value:.4g} nats = {ratio:.3f} x log(out_dim={out_dim})"
            streak = f"for {self.patience} consecutive checks (every {self.every_n_steps} steps)"
            if self.streaks["uniform"] >= self.patience:
                found.append(
                    self._report(
                        "uniform teacher", step, f"{detail}, above {self.max_entropy_ratio} {streak}"
                    )
                )
            if self.streaks["one-hot"] >= self.patience:
                found.append(
                    self._report(
                        "one-hot teacher", step, f"{detail}, below {self.min_entropy_ratio} {streak}"
                    )
                )
        rank = self.feature_rank(pl_module)
        metrics["collapse/feature_rank"] = rank
        if self.start_rank:
            rank_ratio = rank / self.start_rank
            metrics["collapse/feature_rank_ratio"] = rank_ratio
            if rank_ratio < self.min_rank_ratio:
                detail = (
                    f"effective rank of the teacher's CLS features {rank:.3g} = {rank_ratio:.3f} x its start value "
                    f"{self.start_rank:.3g}, below min_rank_ratio {self.min_rank_ratio}"
                )
                found.append(self._report("feature rank", step, detail))
        self.metrics = metrics
        # straight to the loggers, at the step Lightning gives this batch's train/* metrics (as LearningRateMonitor
        # does): self.log would repeat the last values at every logging step between two checks
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.fit_loop.epoch_loop._batches_that_stepped)
        return any(found)

    def _report(self, kind: str, step: int, detail: str) -> str:
        """The one-line message for a collapse of ``kind`` (printed once per kind); returns ``kind``."""
        action = (
            "stopping the run (collapse_guard.stop=true; checkpoints already written are kept)"
            if self.stop
            else "training goes on (--collapse_guard.stop true ends the run instead)"
        )
        message = (
            f"collapse guard: {kind} collapse at step {step}: {detail}; {action}. "
            f"{_CAUSES}; see {DOC_SECTION}"
        )
        if kind not in self.warned:
            self.warned.add(kind)
            self._emit(message)
        return kind

    @rank_zero_only
    def _emit(self, message: str) -> None:
        log.warning(message)
