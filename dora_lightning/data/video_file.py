"""PyAV's ``av.open`` for a local file, whatever its name."""

from __future__ import annotations

import os
from typing import Any

import av

__all__ = ["main_video_stream", "open_video"]


def open_video(path: str | os.PathLike, mode: str = "r", **kwargs: Any) -> Any:
    """``av.open`` of the local file ``path``.

    FFmpeg reads a name that starts with letters, digits or ``+-.`` followed by a colon as a URL: ``10:30.mp4`` (a
    dash-cam's time stamp) is protocol "10" and fails with "Protocol not found". An absolute path starts with ``/``
    and is always a file; messages keep the path as the user gave it."""
    return av.open(os.path.abspath(os.fspath(path)), mode, **kwargs)


def main_video_stream(container: Any) -> Any:
    """The video stream a player would show: FFmpeg's best video stream (never a cover picture or a thumbnail track,
    the one with the most frames among equals), else the first one; None when the file has no video stream."""
    if not container.streams.video:
        return None
    return container.streams.best("video") or container.streams.video[0]
