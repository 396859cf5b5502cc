"""How `dora` and `dora-export` report errors in the user's data, config or checkpoint: one line on stderr and exit
status 2, unless ``--verbose`` or ``DORA_TRACEBACK=1`` asks for the traceback (docs/troubleshooting.md)."""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

TRACEBACK_ENV = "DORA_TRACEBACK"
VERBOSE_FLAG = "--verbose"
_PACKAGE_DIR = Path(__file__).resolve().parent
# the files whose ValueError / FileNotFoundError (RuntimeError: data/ only) are our messages about the user's data,
# config or checkpoint, not bugs: the data module, the model's and collapse guard's argument checks, checkpoint reading
_USER_ERROR_FILES = (
    "data",
    "module.py",
    "model_options.py",
    "collapse_guard.py",
    "checkpoints.py",
    "checkpoint_formats.py",
    "runs.py",
)
_TRAINER_FILE = ("lightning", "pytorch", "trainer", "trainer.py")
_WORKER_FRAME = re.compile(r'File "([^"]+)", line \d+')


def report_error(prog: str, message: str) -> None:
    """Write the one-line error ``PROG: error: MESSAGE`` (message folded to one line) on stderr."""
    sys.stderr.write(f"{prog}: error: {' '.join(str(message).split())}\n")


def exit_with_error(prog: str, message: str) -> NoReturn:
    """:func:`report_error`, then exit with status 2 (as for argument errors)."""
    report_error(prog, message)
    raise SystemExit(2)


# the values of DORA_TRACEBACK that ask for tracebacks (any case); others (0, false, no, empty, ...) do not
TRACEBACK_ON = ("1", "true", "yes", "on")


def wants_traceback(argv: Sequence[str] = ()) -> bool:
    """``--verbose`` in ``argv`` or ``DORA_TRACEBACK`` set to ``1``, ``true``, ``yes`` or ``on`` (any case): show
    tracebacks (``DORA_TRACEBACK=false`` or ``no`` does not)."""
    return VERBOSE_FLAG in argv or os.environ.get(TRACEBACK_ENV, "").strip().lower() in TRACEBACK_ON


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


def os_reason(err: OSError) -> str:
    """Why a file or folder could not be made, in words a user can act on (``mkdir`` says "File exists" or "Not a
    directory" when a part of the path is a file)."""
    if isinstance(err, (FileExistsError, NotADirectoryError)):
        return "a part of the path is a file, not a folder"
    return err.strerror or str(err)


def unwritable_folder(folder: Path, make: bool = True) -> str | None:
    """None when this user can write in ``folder``, else what stops that, as the end of a one-line error:
    ``cannot create 'F' (REASON)`` or ``'F' is not writable by this user``. With ``make`` the folder (and its
    parents) is made now; without, nothing is written: its nearest existing ancestor must be a folder this user can
    write in (checked before work whose results go there, so that a failure leaves nothing behind)."""
    if make:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            return f"cannot create '{folder}' ({os_reason(err)})"
    existing = folder.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"cannot create '{folder}' (a part of the path is a file, not a folder)"
    if not os.access(existing, os.W_OK | os.X_OK):
        return (
            f"'{folder}' is not writable by this user"
            if existing == folder.absolute()
            else (f"cannot create '{folder}' (Permission denied)")
        )
    return None


def raised_building_trainer(err: BaseException) -> bool:
    """True when ``err`` was raised while a Lightning ``Trainer`` was being built (``dora fit``'s, or an evaluator's in
    ``dora validate``): its arguments, the ``--trainer.*`` options, do not fit each other or this machine."""
    tb = err.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        if code.co_name == "__init__" and Path(code.co_filename).parts[-4:] == _TRAINER_FILE:
            return True
        tb = tb.tb_next
    return False


def user_message(err: BaseException) -> str:
    """The one-line message of a user error (:func:`is_user_error`); the Trainer's refusals of its options are named
    as such, with what to give instead on a machine without a usable CUDA GPU."""
    text = one_line(err)
    if not raised_building_trainer(err):
        return text
    hint = _no_gpu_hint(text)
    return f"--trainer options: {text.rstrip('.!') if hint else text}{hint}"


def _no_gpu_hint(text: str) -> str:
    import torch

    if not re.search(r"gpu|cuda", text, re.IGNORECASE) or torch.cuda.is_available():
        return ""
    build = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
    return (
        f"; this machine has no usable CUDA GPU (torch {torch.__version__}, {build}): on the CPU give "
        "--trainer.accelerator cpu --trainer.devices 1 --trainer.precision 32-true (docs/troubleshooting.md, "
        '"The Trainer\'s options")'
    )


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


def is_user_error(err: BaseException) -> bool:
    """True when ``err`` is a message of ours about the user's data, config or checkpoint: a ValueError or
    FileNotFoundError raised by the data, model-config, collapse-guard or checkpoint code (a RuntimeError: by the
    data code), directly or in a DataLoader worker; evaluation data or an evaluator option refused by an evaluator;
    or the Trainer's refusal of its options (:func:`raised_building_trainer`). Any other exception, e.g. one raised
    by torch inside a training step, is a bug and keeps its traceback."""
    from dora_lightning.evaluation.contract import EvaluationDataError, EvaluatorSettingError

    if isinstance(err, (EvaluationDataError, EvaluatorSettingError)) or raised_building_trainer(err):
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
