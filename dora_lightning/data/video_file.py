"""PyAV's ``av.open`` for a local file, whatever its name."""

from __future__ import annotations

import os
from typing import Any

import av

__all__ = ["open_video"]


def open_video(path: str | os.PathLike, mode: str = "r", **kwargs: Any) -> Any:
    """``av.open`` of the local file ``path``.

    FFmpeg reads a name that starts with letters, digits or ``+-.`` followed by a colon as a URL: ``10:30.mp4`` (a
    dash-cam's time stamp) is protocol "10" and fails with "Protocol not found". An absolute path starts with ``/``
    and is always a file; messages keep the path as the user gave it."""
    return av.open(os.path.abspath(os.fspath(path)), mode, **kwargs)
