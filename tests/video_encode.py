"""The encoder behind the generated test videos (PyAV only): ``Fixture`` (a file and the frame a player shows at
every frame index), ``_encode`` (frames of ``frame_pattern`` or any image, any codec, container and timestamps) and
the fixtures' common size and H.264 options; the builders live in video_fixtures.py and video_colour_fixtures.py."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from conftest import frame_pattern

W, H = 96, 64
X264 = {"crf": "16", "preset": "ultrafast", "g": "30", "sc_threshold": "0"}


@dataclass
class Fixture:
    """One generated file: where it is, what a player shows at each frame index, and notes for the tests."""

    path: Path
    expected: list[int] | None
    notes: dict = field(default_factory=dict)


def mux_pattern_frames(
    container: av.container.OutputContainer, stream: av.video.stream.VideoStream, n: int
) -> None:
    """Encode and mux ``frame_pattern`` frames 0..n-1 (pts = index) into ``stream``, then flush the encoder."""
    for i in range(n):
        frame = av.VideoFrame.from_ndarray(frame_pattern(i, W, H), format="rgb24")
        frame.pts = i
        for packet in stream.encode(frame):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)


def _encode(
    path: Path,
    contents: Iterable[tuple[int, int]],
    *,
    codec: str = "libx264",
    rate: Fraction = Fraction(30),
    time_base: Fraction | None = None,
    size: tuple[int, int] = (W, H),
    pix_fmt: str = "yuv420p",
    options: dict | None = None,
    before: Callable[[av.container.OutputContainer], None] | None = None,
    after: Callable[[av.container.OutputContainer], None] | None = None,
    rotation: int | None = None,
    image: Callable[[int, int, int], np.ndarray] = frame_pattern,
    image_format: str = "rgb24",
) -> Path:
    """Encode frames ``(pts, pattern index)`` (pts in ``time_base``, default 1 / rate); ``image`` gives each frame's
    array in ``image_format``."""
    time_base = time_base or 1 / rate
    with av.open(str(path), "w") as container:
        if before is not None:
            before(container)
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], pix_fmt
        stream.codec_context.time_base = time_base
        if options is not None:
            stream.options = options
        if rotation is not None:
            stream.set_display_rotation(rotation)
        if after is not None:
            after(container)
        for pts, index in contents:
            frame = av.VideoFrame.from_ndarray(image(index, size[0], size[1]), format=image_format)
            frame.pts, frame.time_base = pts, time_base
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def _plain(n: int) -> list[tuple[int, int]]:
    return [(i, i) for i in range(n)]
