"""`dora fit`: LightningCLI over DoRAModule and VideoClipDataModule, with the run checks of :mod:`dora_lightning.runs`.

The `dora` command's other subcommands (validate, visualize, compare, export) are dispatched by
:mod:`dora_lightning.command`, which also gives the one-line errors.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from dora_lightning.argument_parser import FIT_EVALUATOR, DoraArgumentParser
from dora_lightning.data.datamodule import VideoClipDataModule
from dora_lightning.errors import TRACEBACK_ENV, VERBOSE_FLAG, exit_with_error, unwritable_folder
from dora_lightning.lightning_output import use_parameter_summary
from dora_lightning.module import DoRAModule
from dora_lightning.runs import (
    LAST,
    CheckpointRefused,
    checkpoint_folders,
    continue_run_log,
    find_last_checkpoint,
    load_initial_weights,
    read_fit_checkpoint,
    refuse_other_model,
    use_run_folder,
)

_LIGHTNING_CKPT_NAMES = ("last", "best", "hpc")  # `--ckpt_path` values Lightning resolves itself


class DoraCLI(LightningCLI):
    """LightningCLI for pretraining (``fit`` only) with the links DoRA needs (the data's batch size feeds the lr
    scaling rule, the data seed the model's), the collapse guard, the checkpoint on SIGTERM / Ctrl-C
    (:mod:`dora_lightning.stopping`), ``--init_from``, and the run checks: ``--ckpt_path last`` is this run's newest
    checkpoint, another run's checkpoint is refused, checkpoints live in the run's folder and are written atomically
    (:mod:`dora_lightning.runs`)."""

    def __init__(
        self, *args: Any, parser_class: type[LightningArgumentParser] = DoraArgumentParser, **kwargs: Any
    ):
        self._resumed_step: int | None = None  # the global step of the --ckpt_path checkpoint
        super().__init__(*args, parser_class=parser_class, **kwargs)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """Only ``fit``: Lightning's validate/test/predict of the pretraining module mean nothing (`dora validate`
        evaluates a checkpoint with an evaluator plugin instead)."""
        return {"fit": LightningCLI.subcommands()["fit"]}

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.batch_size", "model.batch_size")
        parser.link_arguments("data.seed", "model.seed")
        from dora_lightning.collapse_guard import CollapseGuard
        from dora_lightning.evaluation.during_fit import EvaluateDuringFit
        from dora_lightning.run_plan import RunPlan
        from dora_lightning.stopping import StopCheckpoint
        from dora_lightning.throughput import ThroughputLog

        # always on, configurable as --collapse_guard.OPTION (every_n_steps: 0 turns it off); docs/training.md
        parser.add_lightning_class_args(CollapseGuard, "collapse_guard")
        # always on: SIGTERM / Ctrl-C finish the step, save stopped-step=S.ckpt and exit (--on_stop.save false: no save)
        parser.add_lightning_class_args(StopCheckpoint, "on_stop")
        # always on: perf/clips_per_s, perf/steps_per_s, perf/data_wait_fraction (--throughput.every_n_steps 0: off)
        parser.add_lightning_class_args(ThroughputLog, "throughput")
        # always on: one line with the run's plan before its first step (--run_plan.enabled false: off)
        parser.add_lightning_class_args(RunPlan, "run_plan")
        # off unless an evaluator is given: --eval_during.evaluator knn --eval_during.evaluator.data_dir DIR ...
        parser.add_lightning_class_args(EvaluateDuringFit, "eval_during")
        parser.add_argument(
            "--init_from",
            type=str | None,
            default=None,
            help=(
                "start a NEW run from the weights of another run's `dora fit` checkpoint (fresh optimiser, schedules "
                "and data position; the architecture must match). --ckpt_path resumes a run instead."
            ),
        )

    # ------------------------------------------------------------------------------------------------ checkpoints
    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse, then check ``--ckpt_path`` / ``--init_from`` before Lightning reads any checkpoint: ``last`` is
        resolved to this run's newest checkpoint, and a file that is not one of this run's is refused in one line."""
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        section = self.config[subcommand] if subcommand else None
        if section is None:
            return
        if section.get("init_from") is not None:
            if section.get("ckpt_path"):
                self._fail(
                    "--init_from starts a new run from a checkpoint's weights and --ckpt_path resumes a run: give one"
                )
        self._check_method_views(section)
        self._check_run_folder(section)
        if section.get("ckpt_path") == LAST:
            self._resolve_last(section)
        self._check_fit_checkpoint()

    def _check_method_views(self, section: Any) -> None:
        """The DINO/DoRA switch is one choice: ``model.method`` decides how many global crops a frame needs (DoRA
        one, DINO two); a transform that gives another number is refused here, in one line."""
        method = (section.get("model") or {}).get("method")
        transform = (section.get("data") or {}).get("transform")
        init_args = transform.get("init_args") if hasattr(transform, "get") else None
        crops = init_args.get("num_global_crops") if init_args is not None else None
        needed = {"dora": 1, "dino": 2}.get(method)
        if needed is not None and crops is not None and crops != needed:
            self._fail(
                f"model.method={method} needs data.transform.init_args.num_global_crops: {needed}, got {crops}; "
                + (
                    "for the DINO baseline add --config configs/dino.yaml (method, crops and DINO's augmentation)"
                    if method == "dino"
                    else "DoRA tracks objects in one global view per frame"
                )
            )

    def _check_run_folder(self, section: Any) -> None:
        """The run's folder (``trainer.default_root_dir``, else the working directory) must be one this process can
        write: checked (and created) here, in one line, rather than as a traceback once the logger starts. A remote
        folder (``s3://...``) is left to Lightning's file systems."""
        given = (section.get("trainer") or {}).get("default_root_dir")
        if given is not None and "://" in str(given):
            return
        root = Path(given or Path.cwd()).expanduser()
        if (problem := unwritable_folder(root)) is not None:
            self._fail(f"trainer.default_root_dir: {problem}; give a writable folder")

    def _resolve_last(self, section: Any) -> None:
        """``--ckpt_path last``: this run's newest last checkpoint, or (none yet) a new run, said in one line."""
        folders = checkpoint_folders(section.get("trainer") or {})
        found = find_last_checkpoint(folders)
        if found is None:
            where = " or ".join(f"'{folder}'" for folder in folders) or "this run's checkpoint folder"
            sys.stderr.write(
                f"dora fit: --ckpt_path last: no checkpoint in {where} yet; starting a new run\n"
            )
        section["ckpt_path"] = None if found is None else str(found)

    def _check_fit_checkpoint(self) -> None:
        """Refuse a ``--ckpt_path`` that is not a `dora fit` checkpoint, or one of a run with other model settings,
        with one line, before Lightning reads it (:func:`dora_lightning.runs.read_fit_checkpoint`: a pickle that
        would run code is refused here and never reaches Lightning's loader)."""
        ckpt_path = self.config.fit.get("ckpt_path")
        if not ckpt_path or str(ckpt_path) in _LIGHTNING_CKPT_NAMES or str(ckpt_path).startswith("registry"):
            return
        path = Path(ckpt_path)
        usage = "`dora fit --ckpt_path` takes a .ckpt written by `dora fit` (e.g. runs/NAME/checkpoints/last.ckpt or `last`)"
        try:
            checkpoint = read_fit_checkpoint(
                path, "--ckpt_path", usage, "`dora fit` only resumes our own runs"
            )
            refuse_other_model(path, checkpoint, self.config.fit.get("model") or {})
        except CheckpointRefused as err:
            self._fail(str(err))
        self._resumed_step = int(checkpoint.get("global_step") or 0)

    # ------------------------------------------------------------------------------------------------ instantiation
    def instantiate_classes(self) -> None:
        """Lightning's instantiation, then the weights of ``--init_from`` (if given) loaded into the model."""
        super().instantiate_classes()
        init_from = self._get(self.config, "init_from")
        if init_from is not None:
            try:
                load_initial_weights(self.model, Path(init_from), self._get(self.config, "model") or {})
            except CheckpointRefused as err:
                self._fail(str(err))

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        """Lightning's trainer, with checkpoints in the run's folder and written atomically
        (:func:`dora_lightning.runs.use_run_folder`), the model summary without uncounted FLOPs
        (:mod:`dora_lightning.lightning_output`), the processes Lightning's launcher started ended with a failing
        process 0 (:mod:`dora_lightning.launched_processes`); a resumed run logs on in the run's TensorBoard folder
        (:func:`dora_lightning.runs.continue_run_log`)."""
        from dora_lightning.launched_processes import EndLaunchedProcesses

        trainer = super().instantiate_trainer(**kwargs)
        use_run_folder(trainer)
        use_parameter_summary(trainer)
        trainer.callbacks.append(EndLaunchedProcesses())
        if self._resumed_step is not None and self._get(self.config, "trainer").get("logger") in (None, True):
            continue_run_log(trainer, self._resumed_step)
        return trainer

    def _fail(self, message: str) -> NoReturn:
        """A usage error found after parsing: message on stderr, exit status 2 (as for argument errors)."""
        exit_with_error("dora fit", message)


def run_fit(argv: Sequence[str] | None) -> DoraCLI:
    """``dora fit ARGS`` (``argv`` starts with ``fit``; None: LightningCLI reads ``sys.argv``). An evaluator named
    for ``--eval_during.evaluator`` by its registered short name (``knn``) is resolved to its class first."""
    from dora_lightning.evaluation.registry import import_registered
    from dora_lightning.evaluation.runner import rewrite_evaluator_args

    import_registered()  # so that jsonargparse knows the registered class names (KNNEvaluator) in configs too
    given = sys.argv[1:] if argv is None else list(argv)
    resolved = rewrite_evaluator_args(
        given, lambda message: exit_with_error("dora fit", message), key=FIT_EVALUATOR
    )
    if argv is None:
        sys.argv[1:] = resolved
    return DoraCLI(
        DoRAModule,
        VideoClipDataModule,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={
            "prog": "dora",
            "description": "DoRA / DINO self-supervised pretraining from long videos (dora-lightning). Errors in the "
            f"data, config or checkpoint are one line (exit status 2); {VERBOSE_FLAG} or {TRACEBACK_ENV}=1 shows "
            "their traceback.",
        },
        args=None if argv is None else resolved,
    )


def main(args: Sequence[str] | None = None) -> None:
    """The `dora` command (:func:`dora_lightning.command.main`), kept here for ``python -m dora_lightning.cli``."""
    from dora_lightning.command import main as command_main

    command_main(args)


if __name__ == "__main__":
    main(sys.argv[1:])
