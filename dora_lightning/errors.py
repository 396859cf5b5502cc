"""How `dora` and `dora-export` report errors in the user's data, config or checkpoint: one line on stderr and exit
status 2, unless ``--verbose`` or ``DORA_TRACEBACK=1`` asks for the traceback (docs/troubleshooting.md)."""

from __future__ import annotations

import os
from collections.abc import Sequence

TRACEBACK_ENV = "DORA_TRACEBACK"
VERBOSE_FLAG = "--verbose"


def wants_traceback(argv: Sequence[str] = ()) -> bool:
    """``--verbose`` in ``argv`` or ``DORA_TRACEBACK`` set to anything but empty or ``0``: show tracebacks."""
    return VERBOSE_FLAG in argv or os.environ.get(TRACEBACK_ENV, "").strip() not in ("", "0")
