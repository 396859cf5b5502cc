"""``dora validate``: evaluate the backbone of a checkpoint with an evaluator plugin (docs/plugins.md).

``dora validate --evaluator NAME --ckpt_path CKPT [--evaluator.OPTION ...] [--trainer.OPTION ...] [--config F]``:
NAME is a registered name (``knn``), a registered class name (``KNNEvaluator``) or an import path
(``pkg.module:Class``) of an :class:`~dora_lightning.evaluation.contract.Evaluator`. The ``which`` backbone of CKPT (a
`dora fit` checkpoint, a dora-export file or an official DINO/DoRA checkpoint) is loaded at the evaluator's
``image_size`` (:func:`dora_lightning.checkpoints.load_backbone`; never with code execution), ``evaluate(backbone,
trainer_kwargs)`` runs with the ``trainer.*`` options, and (process 0) the metrics are printed and written to
``results_<name>.json`` in ``evaluator.output_dir`` (default ``<trainer.default_root_dir or cwd>/eval/<name>``).
Neither the DoRA module nor the video data is built. Errors in the arguments, the checkpoint or the evaluation data
are one line on stderr and exit status 2.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from dora_lightning.errors import exit_with_error

PROG = "dora validate"
CKPT_KINDS = "a `dora fit` .ckpt, a dora-export backbone or an official DINO/DoRA checkpoint"


def fail(message: str) -> NoReturn:
    """A usage error found after parsing: ``dora validate: error: MESSAGE`` on stderr, exit status 2."""
    exit_with_error(PROG, message)


def resolve_evaluator_value(value: str) -> str:
    """A short name (``knn``), registered class name or ``pkg.mod:Class`` -> the dotted class path jsonargparse takes.

    Values that are not names (a JSON/YAML dict, a config file, ``null``) pass through unchanged.
    """
    from dora_lightning.evaluation.registry import class_path_of, get_evaluator_class

    text = value.strip()
    if not text or text.startswith(("{", "[")) or text in ("null", "None") or Path(text).is_file():
        return value
    return class_path_of(get_evaluator_class(text))


def rewrite_evaluator_args(argv: Sequence[str], error: Callable[[str], NoReturn], key: str) -> list[str]:
    """``argv`` with the value of every ``--KEY`` / ``--KEY.help`` / ``--KEY.class_path`` flag (``key``: one of
    :data:`~dora_lightning.argument_parser.EVALUATOR_KEYS`) resolved by :func:`resolve_evaluator_value`; an unknown name is passed to ``error`` (a parser's)."""
    flags = (f"--{key}", f"--{key}.help", f"--{key}.class_path")

    def resolved(value: str) -> str:
        try:
            return resolve_evaluator_value(value)
        except (ValueError, ImportError) as err:
            error(f"--{key}: {err}")

    out: list[str] = []
    pending = False
    for arg in argv:
        if pending:
            pending = False
            if not arg.startswith("-"):  # `--evaluator.help` may come without a value
                out.append(resolved(arg))
                continue
        flag, eq, value = arg.partition("=")
        if flag in flags:
            out.append(f"{flag}={resolved(value)}" if eq else arg)
            pending = not eq
            continue
        out.append(arg)
    return out


def build_parser() -> Any:
    """The parser of ``dora validate``: ``--config``, ``--evaluator`` (+ its options), ``--ckpt_path``,
    ``--trainer.*`` (Lightning's Trainer arguments)."""
    import lightning.pytorch as pl
    from jsonargparse import ActionConfigFile

    from dora_lightning.argument_parser import DoraArgumentParser
    from dora_lightning.evaluation.contract import Evaluator

    parser = DoraArgumentParser(
        prog=PROG,
        description=(
            "Evaluate the frozen backbone of a checkpoint with an evaluator plugin (knn, linear, segmentation, "
            "davis, or a registered third-party one); see docs/evaluation.md and docs/plugins.md."
        ),
    )
    parser.add_argument(
        "-c", "--config", action=ActionConfigFile, help="a YAML config, e.g. configs/eval/knn.yaml"
    )
    parser.add_subclass_arguments(
        Evaluator,
        "evaluator",
        required=False,
        help=(
            "the evaluator plugin: a registered name (knn, linear, ...), a class name or pkg.module:Class, with its "
            "options as --evaluator.OPTION (list them: --evaluator.help NAME)"
        ),
    )
    parser.add_argument(
        "--ckpt_path", type=str | None, default=None, help=f"the checkpoint to evaluate: {CKPT_KINDS}"
    )
    parser.add_lightning_class_args(pl.Trainer, "trainer")
    return parser


@dataclass
class Evaluation:
    """What one ``dora validate`` run produced (``results_path`` is None on processes other than 0)."""

    metrics: dict[str, float]
    results_path: Path | None
    evaluator: Any
    backbone_info: Any


def _instantiate(parser: Any, config: Any) -> Any:
    try:
        return parser.instantiate_classes(config)
    except ValueError as err:  # e.g. an evaluator refusing its arguments (KNNEvaluator(ks=[0]))
        # jsonargparse lists why each member of Optional[Evaluator] failed; the first reason is the evaluator's
        reason = re.search(r"Errors:\n\s*- (.+)", str(err))
        fail(f"--evaluator: {reason.group(1)}" if reason else str(err))


def run(argv: Sequence[str]) -> Evaluation:
    """Parse ``argv`` (the arguments after ``validate``), load the backbone, evaluate, print and write the results."""
    from lightning.pytorch.utilities import rank_zero_only

    from dora_lightning.argument_parser import VALIDATE_EVALUATOR
    from dora_lightning.checkpoints import load_backbone
    from dora_lightning.errors import one_line, unwritable_folder
    from dora_lightning.evaluation.contract import EvaluationDataError, EvaluatorSettingError, evaluator_name
    from dora_lightning.evaluation.registry import import_registered
    from dora_lightning.evaluation.results import format_table, trainer_settings, write_results

    import_registered()  # so that jsonargparse knows the registered class names; failures surface when named
    parser = build_parser()
    config = parser.parse_args(rewrite_evaluator_args(argv, parser.error, key=VALIDATE_EVALUATOR))
    if config.get("evaluator") is None:
        fail("--evaluator is required: the evaluator plugin to run (knn, linear, segmentation, davis, ...)")
    if not config.get("ckpt_path"):
        fail(f"--evaluator needs --ckpt_path: the checkpoint whose backbone to evaluate ({CKPT_KINDS})")
    init = _instantiate(parser, config)
    evaluator = init.evaluator
    trainer_kwargs = dict(init.trainer)
    if isinstance(trainer_kwargs.get("callbacks"), list):
        trainer_kwargs["callbacks"] = list(trainer_kwargs["callbacks"])
    which = getattr(evaluator, "which", "teacher")
    try:
        backbone, info = load_backbone(
            config.ckpt_path, which=which, img_size=getattr(evaluator, "image_size", None)
        )
    except (FileNotFoundError, ValueError) as err:
        fail(f"--ckpt_path: {err}")
    if info.which is not None and info.which != which:
        # a file of one backbone (an exported student) is that backbone: evaluated, and named, as what it is
        if rank_zero_only.rank == 0:
            sys.stderr.write(
                f"dora validate: '{config.ckpt_path}' holds one backbone, the {info.which}'s: evaluated as the "
                f"{info.which}\n"
            )
        which = evaluator.which = info.which
    name = evaluator_name(type(evaluator))
    output_dir = evaluator.resolved_output_dir(trainer_kwargs)
    if (problem := unwritable_folder(output_dir, make=False)) is not None:  # said before the evaluation
        fail(f"--evaluator.output_dir: {problem}; give a writable folder")
    try:
        metrics = dict(evaluator.evaluate(backbone, dict(trainer_kwargs)))
    except (EvaluationDataError, EvaluatorSettingError) as err:
        fail(f"--evaluator {name}: {one_line(err)}")
    results_path = None
    if rank_zero_only.rank == 0:
        results_path = write_results(
            output_dir,
            name,
            metrics,
            evaluator.protocol(),
            config.ckpt_path,
            backbone=info,
            command=["dora", "validate", *argv],
            trainer=trainer_settings(trainer_kwargs),
        )
        print(format_table(metrics, title=f"{name} evaluation of {config.ckpt_path} ({which})"))
        print(f"results written to {results_path}")
    return Evaluation(metrics, results_path, evaluator, info)


def main(argv: Sequence[str] | None = None) -> Evaluation:
    """``dora validate ...`` (``argv``: the arguments after ``validate``)."""
    return run(list(sys.argv[1:] if argv is None else argv))
