"""The `dora-export` command: write a checkpoint's backbone as a file plain timm loads."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from dora_lightning.checkpoints import export_with_info
from dora_lightning.errors import TRACEBACK_ENV, VERBOSE_FLAG, report_error, wants_traceback


def build_parser() -> argparse.ArgumentParser:
    """Arguments of `dora-export`."""
    parser = argparse.ArgumentParser(
        prog="dora export",
        description=(
            "Export the teacher (or student) ViT backbone of a `dora fit` checkpoint, an exported backbone or an "
            "official DINO/DoRA checkpoint as a timm-compatible file."
        ),
        epilog=f"A checkpoint that cannot be read is one error line; {VERBOSE_FLAG} or {TRACEBACK_ENV}=1 shows the traceback.",
    )
    parser.add_argument("checkpoint", metavar="CKPT", help="checkpoint to read")
    parser.add_argument("output", metavar="OUT", help="file to write")
    parser.add_argument(
        "--which",
        choices=("teacher", "student"),
        default="teacher",
        help="backbone to export (default: teacher)",
    )
    parser.add_argument(
        "--plain",
        action="store_true",
        help="write only the timm state dict (torch.save(model.state_dict())); the model name and kwargs are printed",
    )
    parser.add_argument(
        "--img-size",
        type=int,
        default=None,
        help="input size to export for (interpolates the position embedding)",
    )
    parser.add_argument(
        "--num-heads",
        type=int,
        default=None,
        help="attention heads, for DINO-style weights whose embed dim is not 192/384/768/1024",
    )
    parser.add_argument(
        VERBOSE_FLAG,
        action="store_true",
        help=f"show the traceback of an error instead of one line (or set {TRACEBACK_ENV}=1)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `dora-export`; prints one line saying what was written and how to load it."""
    args = build_parser().parse_args(argv)
    try:
        out, info = export_with_info(
            args.checkpoint,
            args.output,
            args.which,
            plain=args.plain,
            img_size=args.img_size,
            num_heads=args.num_heads,
        )
    except (FileNotFoundError, ValueError) as err:
        if args.verbose or wants_traceback():
            raise
        report_error("dora export", str(err))
        return 2
    what = f"the {info.which} backbone" if info.which else "the backbone"
    state = f'torch.load("{out}")' if args.plain else f'torch.load("{out}")["state_dict"]'
    layout = "timm state dict" if args.plain else "dora-lightning/backbone file"
    print(
        f"wrote {what} of '{info.path}' to '{out}' ({layout}); load it with: "
        f"model = {info.create_model_call()}; model.load_state_dict({state})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
