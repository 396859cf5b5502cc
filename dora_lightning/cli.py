"""The `dora` command: LightningCLI over DoRAModule and VideoClipDataModule (fit, validate, test, predict).

``dora validate --evaluator NAME --ckpt_path CKPT`` evaluates the backbone of a checkpoint with an evaluator plugin
(``knn``, ``linear``, a third-party name registered in the ``dora.evaluators`` entry-point group, or any
``pkg.module:Class`` subclass of :class:`evaluators.base.Evaluator`) instead of running Lightning's validation of
the DoRA module; see docs/plugins.md. Without ``--evaluator``, ``dora validate`` is Lightning's.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_only

from dora_lightning.data.datamodule import VideoClipDataModule
from dora_lightning.errors import (
    TRACEBACK_ENV,
    VERBOSE_FLAG,
    DoraArgumentParser,
    one_line,
    raise_site,
    wants_traceback,
)
from dora_lightning.module import DoRAModule
from dora_lightning.runs import (
    LAST,
    CheckpointRefused,
    checkpoint_folders,
    find_last_checkpoint,
    load_initial_weights,
    read_fit_checkpoint,
    refuse_other_model,
    use_run_folder,
)
from evaluators.base import EvaluationDataError, Evaluator, evaluator_name

_EVALUATOR_FLAGS = ("--evaluator", "--evaluator.help", "--evaluator.class_path")
_CKPT_KINDS = "a `dora fit` .ckpt, a dora-export backbone or an official DINO/DoRA checkpoint"
_SUBCOMMANDS = ("fit", "validate", "test", "predict")
_LIGHTNING_CKPT_NAMES = ("last", "best", "hpc")  # `--ckpt_path` values Lightning resolves itself
_PACKAGE_DIR = Path(__file__).resolve().parent
# the files whose ValueError / FileNotFoundError (RuntimeError: data/ only) are our messages about the user's data,
# config or checkpoint, not bugs: the data module, the model's and collapse guard's argument checks, checkpoint reading
_USER_ERROR_FILES = ("data", "module.py", "collapse_guard.py", "checkpoints.py", "checkpoint_formats.py")


def _resolve_evaluator_value(value: str) -> str:
    """A short name (``knn``), registered class name or ``pkg.mod:Class`` -> the dotted class path jsonargparse takes.

    Values that are not names (a JSON/YAML dict, a config file, ``null``) pass through unchanged.
    """
    from evaluators.registry import class_path_of, get_evaluator_class

    text = value.strip()
    if not text or text.startswith(("{", "[")) or text in ("null", "None") or Path(text).is_file():
        return value
    return class_path_of(get_evaluator_class(text))


def is_user_error(err: BaseException) -> bool:
    """True when ``err`` is a message of ours about the user's data, config or checkpoint: a ValueError or
    FileNotFoundError raised by the data, model-config, collapse-guard or checkpoint code (a RuntimeError: by the
    data code), directly or in a DataLoader worker, or evaluation data refused by an evaluator. Any other exception,
    e.g. one raised by torch inside a training step, is a bug and keeps its traceback."""
    if isinstance(err, EvaluationDataError):
        return True
    site = raise_site(err)
    if site is None:
        return False
    try:
        parts = site.resolve().relative_to(_PACKAGE_DIR).parts
    except ValueError:
        return False  # raised outside dora_lightning (torch, Lightning, numpy, ...)
    if isinstance(err, (ValueError, FileNotFoundError)):
        return parts[0] in _USER_ERROR_FILES
    return isinstance(err, RuntimeError) and parts[0] == "data"


class DoraCLI(LightningCLI):
    """LightningCLI with the links DoRA needs (the data's batch size feeds the lr scaling rule) and ``--evaluator``.

    With ``validate --evaluator E --ckpt_path CKPT``: neither DoRAModule nor the video data module is built, the
    checkpoint's hyperparameters are not read into the model config, and Lightning never loads CKPT into a module;
    instead the ``E.which`` backbone of CKPT is loaded at ``E.image_size`` (:func:`dora_lightning.checkpoints.load_backbone`),
    ``E.evaluate(backbone, trainer_kwargs)`` runs with the ``trainer.*`` options, and the metrics are printed and
    written to ``results_<name>.json`` (in ``E.output_dir``, default ``<trainer.default_root_dir or cwd>/eval/<name>``).
    After the run, ``evaluation_metrics`` and ``results_path`` hold what was written. Evaluation data that is missing
    or malformed (:class:`evaluators.base.EvaluationDataError`) ends the command with one line on stderr, exit status 2.
    """

    evaluator: Evaluator | None = None
    evaluation_metrics: dict[str, float] | None = None
    results_path: Path | None = None

    def __init__(
        self, *args: Any, parser_class: type[LightningArgumentParser] = DoraArgumentParser, **kwargs: Any
    ):
        super().__init__(*args, parser_class=parser_class, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.batch_size", "model.batch_size")
        parser.link_arguments("data.seed", "model.seed")
        from dora_lightning.collapse_guard import CollapseGuard

        # always on, configurable as --collapse_guard.OPTION (every_n_steps: 0 turns it off); docs/training.md
        parser.add_lightning_class_args(CollapseGuard, "collapse_guard")
        parser.add_argument(
            "--init_from",
            type=str | None,
            default=None,
            help=(
                "fit only: start a NEW run from the weights of another run's `dora fit` checkpoint (fresh optimiser, "
                "schedules and data position; the architecture must match). --ckpt_path resumes a run instead."
            ),
        )
        parser.add_subclass_arguments(
            Evaluator,
            "evaluator",
            required=False,
            help=(
                "validate only: evaluate the backbone of --ckpt_path with this evaluator plugin instead of Lightning's "
                "validation: a registered name (knn, linear, ...), a class name or pkg.module:Class, with its options "
                "as --evaluator.OPTION (list them: --evaluator.help NAME). See docs/plugins.md."
            ),
        )

    # ------------------------------------------------------------------------------------------------ parsing
    def _subparser(self, subcommand: str | None) -> LightningArgumentParser:
        return getattr(self, "_subcommand_parsers", {}).get(subcommand, self.parser)

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Map evaluator short names to class paths, parse, and reject ``--evaluator`` where it does not apply."""
        if args is not None and not isinstance(args, (list, tuple)):
            super().parse_arguments(parser, args)  # a dict or Namespace: no command line to rewrite
        else:
            argv = list(sys.argv[1:] if args is None else args)
            subcommands = self.subcommands()
            subcommand = next((a for a in argv if a in subcommands), None)
            if subcommand == "validate":
                from evaluators.registry import import_registered

                import_registered()  # so that jsonargparse knows their class names; failures surface when named
            self._argv = list(argv)  # as typed, for the results file
            argv = self._rewrite_evaluator_args(argv, self._subparser(subcommand))
            if args is not None and len(sys.argv) > 1:
                super().parse_arguments(parser, argv)  # keeps Lightning's warning about args + sys.argv
            else:
                self.config = parser.parse_args(argv)
        self._check_evaluator_config()

    @staticmethod
    def _rewrite_evaluator_args(argv: list[str], parser: LightningArgumentParser) -> list[str]:
        out: list[str] = []
        pending: str | None = None
        for arg in argv:
            if pending is not None:
                pending = None
                if not arg.startswith("-"):  # `--evaluator.help` may come without a value
                    out.append(DoraCLI._resolved_or_error(arg, parser))
                    continue
            flag, eq, value = arg.partition("=")
            if flag in _EVALUATOR_FLAGS:
                if eq:
                    out.append(f"{flag}={DoraCLI._resolved_or_error(value, parser)}")
                else:
                    out.append(arg)
                    pending = flag
                continue
            out.append(arg)
        return out

    @staticmethod
    def _resolved_or_error(value: str, parser: LightningArgumentParser) -> str:
        try:
            return _resolve_evaluator_value(value)
        except (ValueError, ImportError) as err:
            parser.error(f"--evaluator: {err}")

    def _evaluator_config(self) -> Any:
        subcommand = self.config.get("subcommand")
        section = self.config.get(subcommand) if subcommand else self.config
        return None if section is None else section.get("evaluator")

    def _check_evaluator_config(self) -> None:
        subcommand = self.config.get("subcommand")
        if subcommand is None or self._evaluator_config() is None:
            return
        parser = self._subparser(subcommand)
        if subcommand != "validate":
            parser.error(
                f"--evaluator only applies to `dora validate` (got `dora {subcommand}`); evaluate a checkpoint with "
                "`dora validate --evaluator NAME --ckpt_path CKPT`"
            )
        if not self.config[subcommand].get("ckpt_path"):
            parser.error(
                f"--evaluator needs --ckpt_path: the checkpoint whose backbone to evaluate ({_CKPT_KINDS})"
            )

    def _parse_ckpt_path(self) -> None:
        if self._evaluator_config() is not None:
            return  # the DoRA model is not built: its config need not (and, for non-Lightning files, cannot) be refilled
        subcommand = self.config.get("subcommand")
        section = self.config[subcommand] if subcommand else None
        if section is not None and section.get("init_from") is not None:
            if subcommand != "fit":
                self._fail(f"--init_from only applies to `dora fit` (got `dora {subcommand}`)")
            if section.get("ckpt_path"):
                self._fail(
                    "--init_from starts a new run from a checkpoint's weights and --ckpt_path resumes a run: give one"
                )
        if subcommand == "fit" and section.get("ckpt_path") == LAST:
            self._resolve_last(section)
        self._check_fit_checkpoint()
        super()._parse_ckpt_path()

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
        """Refuse a ``--ckpt_path`` that is not a `dora fit` checkpoint, or (fit) one of a run with other model
        settings, with one line, before Lightning reads it (:func:`dora_lightning.runs.read_fit_checkpoint`: a pickle
        that would run code is refused here and never reaches Lightning's loader)."""
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if not ckpt_path or str(ckpt_path) in _LIGHTNING_CKPT_NAMES or str(ckpt_path).startswith("registry"):
            return
        path = Path(ckpt_path)
        usage = (
            f"`dora {subcommand} --ckpt_path` takes a .ckpt written by `dora fit` (e.g. runs/NAME/checkpoints/last.ckpt"
            + (" or `last`)" if subcommand == "fit" else ")")
        )
        resume = "resumes" if subcommand == "fit" else f"runs `dora {subcommand}` on"
        try:
            checkpoint = read_fit_checkpoint(
                path, "--ckpt_path", usage, f"`dora {subcommand}` only {resume} our own runs"
            )
            if subcommand == "fit":
                refuse_other_model(path, checkpoint, self.config[subcommand].get("model") or {})
        except CheckpointRefused as err:
            self._fail(str(err))

    # ------------------------------------------------------------------------------------------------ instantiation
    def instantiate_classes(self) -> None:
        if self._evaluator_config() is None:
            super().instantiate_classes()
            init_from = self._get(self.config, "init_from")
            if init_from is not None:
                try:
                    load_initial_weights(self.model, Path(init_from), self._get(self.config, "model") or {})
                except CheckpointRefused as err:
                    self._fail(str(err))
            return
        # groups (model, data) stay unbuilt Namespaces; subclass arguments (evaluator, callbacks, logger) are built
        instantiate = getattr(self.parser, "instantiate", None) or self.parser.instantiate_classes
        try:
            self.config_init = instantiate(self.config, instantiate_groups=False)
        except ValueError as err:  # e.g. an evaluator refusing its arguments (KNNEvaluator(ks=[0]))
            # jsonargparse lists why each member of Optional[Evaluator] failed; the first reason is the evaluator's
            reason = re.search(r"Errors:\n\s*- (.+)", str(err))
            self._fail(f"--evaluator: {reason.group(1)}" if reason else str(err))
        self.model = None  # type: ignore[assignment]
        self.datamodule = None  # type: ignore[assignment]
        self.evaluator = self._get(self.config_init, "evaluator")
        trainer_config = dict(self._get(self.config_init, "trainer", default={}))
        if isinstance(
            trainer_config.get("callbacks"), list
        ):  # instantiate_trainer extends this list: copy it
            trainer_config["callbacks"] = list(trainer_config["callbacks"])
        self.evaluator_trainer_kwargs: dict[str, Any] = trainer_config
        self.backbone, self.backbone_info = self._load_backbone()
        self.trainer = self.instantiate_trainer()  # not run; LightningCLI expects one

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        """Lightning's trainer, with checkpoints in the run's folder and written atomically
        (:func:`dora_lightning.runs.use_run_folder`)."""
        trainer = super().instantiate_trainer(**kwargs)
        use_run_folder(trainer)
        return trainer

    def _load_backbone(self) -> tuple[Any, Any]:
        from dora_lightning.checkpoints import load_backbone

        evaluator = self.evaluator
        assert evaluator is not None
        ckpt_path = self._get(self.config, "ckpt_path")
        try:
            return load_backbone(
                ckpt_path,
                which=getattr(evaluator, "which", "teacher"),
                img_size=getattr(evaluator, "image_size", None),
            )
        except (FileNotFoundError, ValueError) as err:
            self._fail(f"--ckpt_path: {err}")

    def _fail(self, message: str) -> NoReturn:
        """A usage error found after parsing: message on stderr, exit status 2 (as for argument errors)."""
        subcommand = self.config.get("subcommand")
        prog = f"dora {subcommand}" if subcommand else "dora"
        sys.stderr.write(f"{prog}: error: {message}\n")
        raise SystemExit(2)

    # ------------------------------------------------------------------------------------------------ running
    def validate(self, **kwargs: Any) -> Any:
        """Lightning's ``trainer.validate`` or, with ``--evaluator``, :meth:`run_evaluator` (run by LightningCLI)."""
        if self.evaluator is None:
            return self.trainer.validate(**kwargs)
        return self.run_evaluator()

    def run_evaluator(self) -> dict[str, float]:
        """Evaluate the loaded backbone, then (rank 0) print the metrics table and write ``results_<name>.json``.

        An :class:`~evaluators.base.EvaluationDataError` (the data is missing or malformed) becomes a one-line error
        (:meth:`_fail`); every other exception propagates unchanged.
        """
        from evaluators.results import format_table, write_results

        evaluator = self.evaluator
        assert evaluator is not None
        name = evaluator_name(type(evaluator))
        try:
            metrics = evaluator.evaluate(self.backbone, dict(self.evaluator_trainer_kwargs))
        except EvaluationDataError as err:
            self._fail(f"--evaluator {name}: {one_line(err)}")
        root = self.evaluator_trainer_kwargs.get("default_root_dir") or Path.cwd()
        output_dir = Path(evaluator.output_dir) if evaluator.output_dir else Path(root) / "eval" / name
        self.evaluation_metrics = dict(metrics)
        if rank_zero_only.rank == 0:
            ckpt_path = self._get(self.config, "ckpt_path")
            argv = getattr(self, "_argv", None)
            self.results_path = write_results(
                output_dir,
                name,
                metrics,
                evaluator.protocol(),
                ckpt_path,
                backbone=self.backbone_info,
                command=["dora", *argv] if argv is not None else None,
            )
            which = getattr(evaluator, "which", "teacher")
            print(format_table(metrics, title=f"{name} evaluation of {ckpt_path} ({which})"))
            print(f"results written to {self.results_path}")
        return metrics


def main(args: Sequence[str] | None = None) -> None:
    """Entry point of the `dora` console script (``dora visualize ...`` goes to :mod:`dora_lightning.visualize`).

    A data, config or checkpoint error (:func:`is_user_error`) ends the command with one line on stderr,
    ``dora SUBCOMMAND: error: ...``, and exit status 2; ``--verbose`` (anywhere on the command line) or
    ``DORA_TRACEBACK=1`` shows its traceback instead. Other exceptions propagate with their traceback.
    """
    argv = list(sys.argv[1:] if args is None else args)
    if argv[:1] == ["visualize"]:
        from dora_lightning.visualize import main as visualize_main

        status = visualize_main(argv[1:])
        if status:
            raise SystemExit(status)
        return
    verbose = wants_traceback(argv)
    if VERBOSE_FLAG in argv:
        argv = [a for a in argv if a != VERBOSE_FLAG]
        if args is None:
            sys.argv[1:] = argv  # LightningCLI reads sys.argv when args is None
    subcommand = next((a for a in argv if a in _SUBCOMMANDS), None)
    try:
        DoraCLI(
            DoRAModule,
            VideoClipDataModule,
            seed_everything_default=0,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={
                "prog": "dora",
                "description": "DoRA / DINO self-supervised pretraining from long videos (dora-lightning). "
                "Also: `dora visualize --help` renders a checkpoint's attention and object tracks on a video. "
                f"Errors in the data, config or checkpoint are one line (exit status 2); {VERBOSE_FLAG} or "
                f"{TRACEBACK_ENV}=1 shows their traceback.",
            },
            args=argv if args is not None else None,
        )
    except Exception as err:
        if verbose or not is_user_error(err):
            raise
        prog = f"dora {subcommand}" if subcommand else "dora"
        sys.stderr.write(f"{prog}: error: {one_line(err)}\n")
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
