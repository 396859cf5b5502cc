"""The `dora` command, one front door: ``dora fit | validate | visualize | compare | export``.

Each subcommand lives in its own module, imported only when it runs, so ``dora --help`` answers without importing
torch. A data, config or checkpoint error (:func:`dora_lightning.errors.is_user_error`) ends ``fit`` and
``validate`` with one line on stderr, ``dora SUBCOMMAND: error: ...``, and exit status 2; ``--verbose`` (anywhere on
the command line) or ``DORA_TRACEBACK=1`` shows its traceback instead. Other exceptions keep their traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from dora_lightning.errors import TRACEBACK_ENV, VERBOSE_FLAG, exit_with_error, wants_traceback

SUBCOMMANDS = {
    "fit": "pretrain with DoRA or DINO on long videos (LightningCLI; dora fit --help)",
    "validate": "evaluate a checkpoint's frozen backbone with an evaluator plugin: knn, linear, segmentation, davis",
    "visualize": "render a checkpoint's attention maps and object tracks on a video or a frame folder",
    "compare": "does it learn? random init vs DINO vs DoRA pretrained and evaluated at the same budget",
    "export": "write a checkpoint's backbone as a timm-compatible file (also the dora-export command)",
}


def usage() -> str:
    """The text of ``dora --help``."""
    width = max(map(len, SUBCOMMANDS))
    lines = [
        "usage: dora SUBCOMMAND [options]",
        "",
        "dora-lightning: DoRA / DINO self-supervised pretraining of ViTs from long videos, and its evaluation.",
        "",
        "subcommands (dora SUBCOMMAND --help for their options):",
        *(f"  {name:<{width}}  {text}" for name, text in SUBCOMMANDS.items()),
        "",
        f"Errors in the data, config or checkpoint are one line (exit status 2); {VERBOSE_FLAG} or {TRACEBACK_ENV}=1",
        "shows their traceback. Docs: docs/index.md.",
    ]
    return "\n".join(lines)


def _run(subcommand: str, argv: list[str], from_console: bool) -> int:
    if subcommand in ("fit", "validate", "compare"):  # they run Lightning Trainers
        from dora_lightning.lightning_output import quiet_lightning

        quiet_lightning()
    if subcommand == "fit":
        from dora_lightning.cli import run_fit

        if from_console:  # LightningCLI reads the command line itself (and warns when given it as well)
            sys.argv[1:] = argv
        run_fit(None if from_console else argv)
        return 0
    if subcommand == "validate":
        from dora_lightning.evaluation.runner import run

        run(argv[1:])
        return 0
    if subcommand == "visualize":
        from dora_lightning.visualize import main as visualize_main

        return visualize_main(argv[1:]) or 0
    if subcommand == "compare":
        from dora_lightning.compare import main as compare_main

        compare_main(argv[1:])
        return 0
    from dora_lightning.export import main as export_main

    return export_main(argv[1:]) or 0


def main(args: Sequence[str] | None = None) -> None:
    """Entry point of the `dora` console script."""
    argv = list(sys.argv[1:] if args is None else args)
    verbose = wants_traceback(argv)
    argv = [a for a in argv if a != VERBOSE_FLAG]
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), file=sys.stdout if argv else sys.stderr)
        raise SystemExit(0 if argv else 2)
    subcommand = argv[0]
    if subcommand not in SUBCOMMANDS:
        exit_with_error(
            "dora", f"unknown subcommand '{subcommand}'; use one of {', '.join(SUBCOMMANDS)} (dora --help)"
        )
    if subcommand == "fit" and any(a.split("=", 1)[0].startswith("--evaluator") for a in argv):
        exit_with_error(
            "dora fit",
            "--evaluator only applies to `dora validate` (got `dora fit`); evaluate a checkpoint with "
            "`dora validate --evaluator NAME --ckpt_path CKPT`",
        )
    try:
        status = _run(subcommand, argv, from_console=args is None)
    except Exception as err:
        from dora_lightning.errors import is_user_error, user_message

        if verbose or not is_user_error(err):
            raise
        exit_with_error(f"dora {subcommand}", user_message(err))
    if status:
        raise SystemExit(status)


if __name__ == "__main__":
    main()
