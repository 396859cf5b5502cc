"""`dora fit`: LightningCLI over DoRAModule and VideoClipDataModule, with the run checks of :mod:`dora_lightning.runs`.

The `dora` command's other subcommands (validate, visualize, compare, export) are dispatched by
:mod:`dora_lightning.command`, which also gives the one-line errors.
"""

from __future__ import annotations

import os
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
    default_checkpoint_folder,
    find_last_checkpoint,
    is_remote,
    load_initial_weights,
    local_path,
    read_fit_checkpoint,
    refuse_other_model,
    refuse_weights_only,
    use_run_folder,
)

# `--ckpt_path` keywords of Lightning's that mean nothing in a new `dora fit` process (`best`: the best checkpoint of
# an earlier fit of the same Trainer; `hpc`: Lightning's own SLURM requeue checkpoints, which `dora fit` replaces
# with stopped-step=S.ckpt; `registry`: Lightning's model registry): refused in one line
_LIGHTNING_CKPT_NAMES = ("best", "hpc", "registry")
CKPT_PATH_HELP = (
    "resume a run: `last` (the newest .ckpt in this run's checkpoint folder, <trainer.default_root_dir>/checkpoints "
    "or a ModelCheckpoint's dirpath; a new run when there is none yet, said in one line: the same command serves "
    "the first start and every restart), or the path of a `dora fit` checkpoint that holds the run's state (not a "
    "save_weights_only one; `~` is expanded). A new run from another run's weights: --init_from. Lightning's `best`, "
    "`hpc` and `registry` are not taken, nor an empty value (an unset shell variable?): leave the option out for a "
    "new run."
)
ROOT_DIR_HELP = (
    "the run's folder (default: the working directory; `~` is expanded): checkpoints in <it>/checkpoints (also with "
    "ModelCheckpoint callbacks, unless one names a dirpath), TensorBoard logs in <it>/lightning_logs/version_N. A new "
    "run refuses a folder whose checkpoints/ holds checkpoints already: resume it with --ckpt_path last."
)
_HELP = {"ckpt_path": CKPT_PATH_HELP, "trainer.default_root_dir": ROOT_DIR_HELP}


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

    def _prepare_subcommand_parser(
        self, klass: type, subcommand: str, **kwargs: Any
    ) -> LightningArgumentParser:
        """Lightning's parser of ``fit``, with the help of ``--ckpt_path`` and ``--trainer.default_root_dir`` saying
        what `dora fit` does with them (Lightning's texts offer its own keywords and another meaning of ``last``, and
        a root used only "when no logger/ckpt_callback passed")."""
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        for action in parser._actions:
            action.help = _HELP.get(action.dest, action.help)
        return parser

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
        """Parse, then check, before anything is built or written: the ``--ckpt_path`` value (Lightning's keywords
        and an empty value refused; ``~`` expanded, as in ``--init_from``), ``trainer.*`` values Lightning takes but
        fails on later, the run's folders (writable), ``last`` (resolved to this run's newest checkpoint), a new run
        into a folder holding a run's checkpoints (refused), and the checkpoint itself (one of this run's, with its
        state); each refusal is one line."""
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        section = self.config[subcommand] if subcommand else None
        if section is None:
            return
        self._check_ckpt_path_value(section)
        if section.get("init_from") is not None:
            if section.get("ckpt_path") is not None:
                self._fail(
                    "--init_from starts a new run from a checkpoint's weights and --ckpt_path resumes a run: give one"
                )
            section["init_from"] = os.path.expanduser(str(section["init_from"]))
        self._check_trainer_values(section)
        self._check_method_views(section)
        self._check_run_folder(section)
        picked_by_last = section.get("ckpt_path") == LAST
        if picked_by_last:
            self._resolve_last(section)
        if section.get("ckpt_path") is None:
            self._refuse_other_runs_checkpoints(section)
        self._check_fit_checkpoint(picked_by_last and section.get("ckpt_path") is not None)

    def _check_ckpt_path_value(self, section: Any) -> None:
        """``--ckpt_path``: an empty value and Lightning's keywords other than ``last`` are refused in one line (they
        ended in Lightning's tracebacks); a path's leading ``~`` is expanded (Lightning reads the path as given)."""
        value = section.get("ckpt_path")
        if value is None:
            return
        text = str(value)
        if not text.strip():
            self._fail(
                "--ckpt_path is empty (an unset shell variable?); give `last` (this run's newest checkpoint, or a new "
                "run when there is none yet) or a checkpoint file, or leave the option out for a new run"
            )
        if text in _LIGHTNING_CKPT_NAMES or text.startswith("registry:"):
            self._fail(
                f"--ckpt_path {text}: Lightning's keyword is not taken by `dora fit`; give `last` (this run's newest "
                "checkpoint) or the path of a checkpoint file"
            )
        if text != LAST:
            section["ckpt_path"] = os.path.expanduser(text)

    def _check_trainer_values(self, section: Any) -> None:
        """``trainer.*`` values that Lightning takes but that fail later with a traceback."""
        accumulate = (section.get("trainer") or {}).get("accumulate_grad_batches")
        if isinstance(accumulate, int) and accumulate < 1:
            self._fail(
                f"trainer.accumulate_grad_batches must be >= 1 (batches per optimiser step), got {accumulate}"
            )

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
        write (or create): checked here, in one line, rather than as a traceback once the logger starts; so must
        its checkpoint folders (``<root>/checkpoints``, a ModelCheckpoint's ``dirpath``) and the default logger's
        folder when they exist already (made by another user, or by an earlier run under sudo or docker), rather
        than at the first save, after an epoch of training. A remote folder (``s3://...``) is left to Lightning's
        file systems."""
        trainer = section.get("trainer") or {}
        given = trainer.get("default_root_dir")
        if is_remote(given):
            return
        root = local_path(given or Path.cwd())
        # not made here: a run that stops on a configuration error leaves no empty folder behind (Lightning makes it)
        if (problem := unwritable_folder(root, make=False)) is not None:
            self._fail(f"trainer.default_root_dir: {problem}; give a writable folder")
        folders = [(folder, "trainer.default_root_dir") for folder in self._log_folders(trainer, root)]
        folders += [(folder, _folder_option(folder, trainer)) for folder in checkpoint_folders(trainer)]
        for folder, key in folders:
            if not is_remote(folder) and (problem := unwritable_folder(folder, make=False)) is not None:
                self._fail(f"{key}: {problem}; give a writable folder")

    @staticmethod
    def _log_folders(trainer: Any, root: Path) -> list[Path]:
        """The default logger's folders a run writes in: ``<root>/lightning_logs`` and its newest ``version_N``
        (where a resumed run logs on); none for a logger given explicitly or turned off."""
        if trainer.get("logger") not in (None, True):
            return []
        logs = root / "lightning_logs"
        versions = [p for p in logs.glob("version_*") if p.is_dir()] if logs.is_dir() else []
        return [logs, *([max(versions, key=lambda p: p.stat().st_mtime_ns)] if versions else [])]

    def _refuse_other_runs_checkpoints(self, section: Any) -> None:
        """A new run (no ``--ckpt_path``, or ``--init_from``) into a checkpoint folder that holds checkpoints already
        would overwrite them (same names, e.g. ``enable_version_counter: false``) or re-point ``last.ckpt``: refused
        in one line, before anything is written. A ``trainer.fast_dev_run`` smoke test writes no checkpoint."""
        trainer = section.get("trainer") or {}
        if trainer.get("fast_dev_run"):
            return
        for folder in checkpoint_folders(trainer):
            found = None if is_remote(folder) else find_last_checkpoint([folder])
            if found is None:
                continue
            key = _folder_option(folder, trainer)
            resume = (
                "" if section.get("init_from") is not None else "continue that run with --ckpt_path last, or "
            )
            self._fail(
                f"{key}: '{folder}' already holds the checkpoints of a run (newest: {found.name}) and a new run "
                f"would overwrite them; {resume}give this run another trainer.default_root_dir (or move those "
                "checkpoints away)"
            )

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

    def _check_fit_checkpoint(self, picked_by_last: bool = False) -> None:
        """Refuse a ``--ckpt_path`` that is not a `dora fit` checkpoint, one that holds weights but not the run's
        state (``save_weights_only``, `dora compare`'s random init), or one of a run with other model settings, with
        one line, before Lightning reads it (:func:`dora_lightning.runs.read_fit_checkpoint`: a pickle that would
        run code is refused here and never reaches Lightning's loader)."""
        ckpt_path = self.config.fit.get("ckpt_path")
        if ckpt_path is None:
            return
        path = Path(ckpt_path)
        usage = "`dora fit --ckpt_path` takes a .ckpt written by `dora fit` (e.g. runs/NAME/checkpoints/last.ckpt or `last`)"
        try:
            checkpoint = read_fit_checkpoint(
                path, "--ckpt_path", usage, "`dora fit` only resumes our own runs"
            )
            refuse_weights_only(path, checkpoint, picked_by_last)
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


def _folder_option(folder: Path, trainer: Any) -> str:
    """The option that names a checkpoint ``folder`` in a message: ``trainer.default_root_dir`` for
    ``<root>/checkpoints``, else a ModelCheckpoint's ``dirpath``."""
    inside = folder == default_checkpoint_folder(trainer.get("default_root_dir"))
    return "trainer.default_root_dir" if inside else "ModelCheckpoint dirpath"
