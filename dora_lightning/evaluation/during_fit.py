"""EvaluateDuringFit: an evaluator plugin run on the backbone being trained, before the first step and every few
epochs, its metrics written to the run's loggers (``eval/<name>/<metric>``, e.g. ``eval/knn/top1_k20``): is the run
learning, and since when?

``dora fit ... --eval_during.evaluator knn --eval_during.evaluator.data_dir DIR --eval_during.evaluator.image_size 64``
(docs/training.md, "Evaluating while training"). The evaluation is the same protocol as ``dora validate --evaluator``
on the same weights (the position embedding is resized per forward, timm's dynamic size, where ``dora validate``
resizes it once at load), on a copy of the backbone, in process 0 on its own device with a Trainer of its own; the
other processes wait for it as long as ``wait_hours`` allows (not the training process group's timeout). It leaves
the run as it was: the random number generators (torch, CUDA, numpy, Python) and
Lightning's seed variables are restored afterwards, so a run trains the same weights with or without it (tested).
"""

from __future__ import annotations

import copy
import os
import random
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import SIGTERMException

from dora_lightning.distributed import PatientVote
from dora_lightning.errors import one_line
from dora_lightning.evaluation.contract import Evaluator, evaluator_name
from dora_lightning.evaluation.results import format_value

__all__ = ["EvaluateDuringFit", "isolated_randomness"]

_SEED_VARIABLES = ("PL_GLOBAL_SEED", "PL_SEED_WORKERS")  # what lightning.seed_everything sets


@contextmanager
def isolated_randomness(device: torch.device) -> Iterator[None]:
    """Run the body with the random state of torch (CPU and ``device``), numpy and Python saved and restored, and
    Lightning's seed variables too: an evaluation that seeds everything leaves the training's streams untouched."""
    devices = [device.index or 0] if device.type == "cuda" else []
    numpy_state, python_state = np.random.get_state(), random.getstate()
    variables = {name: os.environ.get(name) for name in _SEED_VARIABLES}
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            np.random.set_state(numpy_state)
            random.setstate(python_state)
            for name, value in variables.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


class EvaluateDuringFit(Callback):
    """Run ``evaluator`` on the model's teacher (or student, as the evaluator's ``which`` says) before training and
    after every ``every_n_epochs`` epochs; write its metrics as ``eval/<name>/<metric>`` at the global step and print
    them in one line (see the module docstring).

    Args:
        evaluator: an evaluator plugin (``knn``, ``linear``, ... with its options); None: nothing is evaluated.
        every_n_epochs: evaluate after every this many epochs (and after the last one); 0: only before training.
        at_start: also evaluate before the first step of a new run (the random init: the baseline of the curve).
        wait_hours: in a run of several processes, how long the others wait for process 0's evaluation before
            they stop the run; the wait is outside the training's collectives, so an evaluation may take longer than
            the process group's timeout (30 minutes by default).
    """

    def __init__(
        self,
        evaluator: Evaluator | None = None,
        every_n_epochs: int = 1,
        at_start: bool = True,
        wait_hours: float = 12.0,
    ) -> None:
        if every_n_epochs < 0:
            raise ValueError(f"eval_during.every_n_epochs must be >= 0, got {every_n_epochs}")
        if not wait_hours > 0:
            raise ValueError(f"eval_during.wait_hours must be > 0, got {wait_hours}")
        self.evaluator = evaluator
        self.every_n_epochs = int(every_n_epochs)
        self.at_start = bool(at_start)
        self.wait_hours = float(wait_hours)
        self.history: list[dict[str, Any]] = []  # (process 0) every evaluation: epoch, step, metrics
        self._process_zero_failed: PatientVote | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.evaluator is None:
            return
        # built by every process here (a collective), used after each evaluation, freed at teardown
        self._process_zero_failed = PatientVote(trainer.world_size, timedelta(hours=self.wait_hours))
        # before the first step of a new run; an error here stops the run before any training is lost
        if self.at_start and trainer.global_step == 0:
            self._evaluate(trainer, pl_module, epoch=None, strict=True)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._process_zero_failed is not None:
            self._process_zero_failed.close()
            self._process_zero_failed = None

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.evaluator is None:
            return
        epoch = trainer.current_epoch + 1  # epochs completed
        last = trainer.max_epochs is not None and 0 < trainer.max_epochs <= epoch  # -1: no epoch limit
        if not (self.every_n_epochs and (epoch % self.every_n_epochs == 0 or last)):
            return
        if trainer.should_stop:
            # a stop (SIGTERM, Ctrl-C, max_time, the collapse guard) ends the run at this epoch's end: it is not kept
            # waiting for an evaluation (a preemption's notice is short), and an epoch cut short is not evaluated as
            # done
            if trainer.is_global_zero:
                name = evaluator_name(type(self.evaluator))
                sys.stderr.write(
                    f"dora fit: eval_during ({name}) after epoch {epoch} left out: the run is stopping\n"
                )
            return
        # after training has run, a failing evaluation is said and training goes on (the epoch is not lost)
        self._evaluate(trainer, pl_module, epoch=epoch, strict=False)

    def _evaluate(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, epoch: int | None, strict: bool
    ) -> None:
        failure: Exception | None = None
        if trainer.is_global_zero:
            try:
                self._evaluate_here(trainer, pl_module, epoch, strict)
            except Exception as err:  # noqa: BLE001 - a strict evaluation's failure, raised below on every process
                failure = err
        # every process learns whether process 0 failed, so that all stop together: one left waiting at a barrier
        # while process 0 stops would wait for the collective's timeout (30 minutes with NCCL) with its GPU held
        assert self._process_zero_failed is not None, "on_train_start builds the vote"
        failed = self._process_zero_failed.any(failure is not None)
        if failure is not None:
            raise _in_fit_terms(failure)
        if failed:
            raise SystemExit(2)  # process 0 says why, in one line

    def _evaluate_here(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, epoch: int | None, strict: bool
    ) -> None:
        """Process 0: evaluate, then log and say the metrics, or say in one line why there are none."""
        assert self.evaluator is not None
        name = evaluator_name(type(self.evaluator))
        when = "before training" if epoch is None else f"after epoch {epoch}"
        began = time.perf_counter()
        try:
            metrics = self._metrics(trainer, pl_module)
        except SIGTERMException:
            # the evaluator's Trainer stops its loop on SIGTERM (its handler runs with dora fit's, which noted the
            # signal too): the evaluation is cut short, and the run stops after its next step as usual, its
            # epoch-end checkpoints written first, every process with it
            sys.stderr.write(
                f"dora fit: eval_during ({name}) {when} cut short by SIGTERM; the run stops after its next step\n"
            )
            return
        except Exception as err:  # noqa: BLE001 - any evaluator failure: one line, training goes on
            if strict:
                raise
            sys.stderr.write(
                f"dora fit: eval_during ({name}) failed {when}: {one_line(_in_fit_terms(err))}\n"
            )
            return
        step = trainer.global_step
        # evaluators name their metrics "<name>/<metric>"; others get the evaluator's name in front
        logged = {f"eval/{key if '/' in key else f'{name}/{key}'}": float(v) for key, v in metrics.items()}
        for logger in trainer.loggers:
            logger.log_metrics(logged, step=step)
        self.history.append({"epoch": epoch or 0, "step": step, "metrics": dict(metrics)})
        shown = ", ".join(f"{key} {format_value(value)}" for key, value in metrics.items())
        at = when if epoch is None else f"{when} (step {step})"
        sys.stderr.write(f"dora fit: {name} {at}: {shown} ({time.perf_counter() - began:.1f} s)\n")

    def _metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        """The evaluator's metrics on a frozen copy of the backbone, on process 0's device, randomness isolated."""
        assert self.evaluator is not None
        pair = getattr(pl_module, self.evaluator.which)
        backbone = copy.deepcopy(pair.backbone).eval()
        device = pl_module.device
        trainer_kwargs: dict[str, Any] = {
            "accelerator": "gpu" if device.type == "cuda" else "cpu",
            "devices": [device.index or 0] if device.type == "cuda" else 1,
            "logger": False,
            "enable_checkpointing": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "default_root_dir": trainer.default_root_dir,
        }
        with isolated_randomness(device):
            return self.evaluator.evaluate(backbone, trainer_kwargs)


def _in_fit_terms(err: Exception) -> Exception:
    """``err`` with the evaluator's options named as ``dora fit`` takes them (``--eval_during.evaluator.X``; the
    evaluators' messages name ``dora validate``'s ``--evaluator.X``), of the same type; else ``err`` itself."""
    message = str(err)
    if "--evaluator." not in message or len(err.args) != 1:
        return err
    try:
        renamed = type(err)(message.replace("--evaluator.", "--eval_during.evaluator."))
    except Exception:  # noqa: BLE001 - an exception type that cannot be rebuilt from its message
        return err
    return renamed.with_traceback(err.__traceback__)
