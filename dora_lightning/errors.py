"""How `dora` and `dora-export` report errors in the user's data, config or checkpoint: one line on stderr and exit
status 2, unless ``--verbose`` or ``DORA_TRACEBACK=1`` asks for the traceback (docs/troubleshooting.md)."""

from __future__ import annotations

import difflib
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from lightning.pytorch.cli import LightningArgumentParser

TRACEBACK_ENV = "DORA_TRACEBACK"
VERBOSE_FLAG = "--verbose"
_WORKER_FRAME = re.compile(r'File "([^"]+)", line \d+')


def wants_traceback(argv: Sequence[str] = ()) -> bool:
    """``--verbose`` in ``argv`` or ``DORA_TRACEBACK`` set to anything but empty or ``0``: show tracebacks."""
    return VERBOSE_FLAG in argv or os.environ.get(TRACEBACK_ENV, "").strip() not in ("", "0")


def one_line(err: BaseException) -> str:
    """The message of ``err`` on one line.

    An error raised in a DataLoader worker comes back re-raised with the worker's traceback in its message
    (``Caught X in DataLoader worker process 0. Original Traceback ...``); its last line holds the original message,
    after ``module.Class: `` (``Class: `` for builtins). Any other message on several lines is joined into one.
    """
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if len(lines) <= 1:
        return lines[0] if lines else type(err).__name__
    if not any(line.startswith("Original Traceback") for line in lines[:3]):
        return " ".join(lines)  # a message of ours on several lines
    last = lines[-1]
    # the traceback names builtins by their bare name (ValueError: ...), other classes with their module
    for prefix in (f"{type(err).__module__}.{type(err).__qualname__}: ", f"{type(err).__qualname__}: "):
        if last.startswith(prefix):
            return last[len(prefix) :]
    return last


def raise_site(err: BaseException) -> Path | None:
    """The file whose code raised ``err``: its innermost frame or, for an error re-raised from a DataLoader worker,
    the innermost frame of the worker's traceback (quoted in the message)."""
    if "Original Traceback" in str(err):
        files = _WORKER_FRAME.findall(str(err))
        return Path(files[-1]) if files else None
    tb = err.__traceback__
    if tb is None:
        return None
    while tb.tb_next is not None:
        tb = tb.tb_next
    return Path(tb.tb_frame.f_code.co_filename)


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
        from jsonargparse._common import debug_mode_active

        # jsonargparse parses nested values with exit_on_error off and expects its ArgumentError; JSONARGPARSE_DEBUG
        if not self.exit_on_error or debug_mode_active():
            super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        prog = parser.prog.replace(" [options]", "")
        text = " ".join(line.strip() for line in str(message).splitlines() if line.strip())
        sys.stderr.write(f"{prog}: error: {text}{did_you_mean(text, parser)} (options: {prog} --help)\n")
        raise SystemExit(2)
