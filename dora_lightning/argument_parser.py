"""The argument parser of the `dora` subcommands: errors are one line on stderr with a "did you mean", exit status 2."""

from __future__ import annotations

import difflib
import os
from typing import Any, NoReturn

from lightning.pytorch.cli import LightningArgumentParser

from dora_lightning.errors import exit_with_error


def did_you_mean(message: str, parser: Any) -> str:
    """`` did you mean --KEY?`` for the first unrecognized ``--key`` of ``message`` close to an option of ``parser``."""
    if "unrecognized arguments" not in message:
        return ""
    options = [
        o for action in getattr(parser, "_actions", []) for o in action.option_strings if o.startswith("--")
    ]
    for token in message.split("unrecognized arguments:", 1)[1].split():
        if token.startswith("--"):
            key = token.split("=", 1)[0]
            close = difflib.get_close_matches(key, options, n=1, cutoff=0.75)
            if close:
                return f"; did you mean {close[0]}?"
    return ""


class DoraArgumentParser(LightningArgumentParser):
    """A parser whose errors are one line on stderr (``dora fit: error: ...``; no usage text), exit status 2."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        # jsonargparse parses nested values with exit_on_error off and expects its ArgumentError; its documented
        # JSONARGPARSE_DEBUG environment variable asks for its own (full) errors
        debug = os.environ.get("JSONARGPARSE_DEBUG", "").lower() not in ("", "0", "false")
        if not self.exit_on_error or debug:
            super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        prog = parser.prog.replace(" [options]", "")
        text = " ".join(line.strip() for line in str(message).splitlines() if line.strip())
        exit_with_error(prog, f"{text}{did_you_mean(text, parser)} (options: {prog} --help)")
