"""Interlaced video trains on one moment per frame: the first displayed field, not both fields' double image."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest

from dora_lightning.data.decode_stats import DecodeStats
from dora_lightning.data.reader import RangeReader
from dora_lightning.data.sources import probe_videos

WIDTH, HEIGHT, FRAMES, BAR = 320, 240, 24, 8


def bar_columns(t: int) -> tuple[int, int]:
    """Where frame ``t``'s bar starts in its top and its bottom field (the bottom field is filmed later)."""
    return 10 + 10 * t, 16 + 10 * t


def write_interlaced(path: Path, bottom_first: bool) -> Path:
    """An interlaced H.264 file: in frame t the even lines show a bright bar at ``bar_columns(t)[0]``, the odd lines
    at ``bar_columns(t)[1]`` (a moving object filmed twice per frame)."""
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        order = "bff=1" if bottom_first else "tff=1"
        stream.codec_context.options = {
            "flags": "+ilme+ildct",
            "x264-params": f"interlaced=1:{order}",
            "crf": "12",
        }
        for t in range(FRAMES):
            image = np.full((HEIGHT, WIDTH, 3), 30, np.uint8)
            top, bottom = bar_columns(t)
            image[0::2, top : top + BAR] = 230
            image[1::2, bottom : bottom + BAR] = 230
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def read_all(path: Path, compact: bool = False, first_field: bool = True) -> list[np.ndarray]:
    (info,) = probe_videos([str(path)], min_frames=1)
    size, stats = (WIDTH, HEIGHT // 2), DecodeStats()
    reader = RangeReader(
        info, 0, info.num_frames, size, lambda i: True, stats, compact=compact, first_field=first_field
    )
    frames = [frame for _, frame in reader]
    assert len(frames) == FRAMES and all(frame is not None for frame in frames)
    return [f if isinstance(f, np.ndarray) else f.to_ndarray(format="rgb24") for f in frames]


def bright_columns(frame: np.ndarray) -> np.ndarray:
    return np.flatnonzero(frame[..., 0].astype(float).mean(axis=0) > 100)


@pytest.mark.parametrize("bottom_first", [False, True])
@pytest.mark.parametrize("compact", [False, True])
def test_an_interlaced_frame_is_its_first_field(tmp_path, bottom_first, compact):
    """Read at half height (as training scales 1080i to a 320 short side): each frame shows the bar once, where the
    field displayed first has it; the frame count is the file's."""
    path = write_interlaced(tmp_path / "interlaced.mp4", bottom_first)
    with av.open(str(path)) as container:
        assert next(container.decode(video=0)).interlaced_frame
    for t, frame in enumerate(read_all(path, compact)):
        columns = bright_columns(frame)
        start = bar_columns(t)[1 if bottom_first else 0]
        assert abs(columns.min() - start) <= 1 and len(columns) <= BAR + 2, (t, columns.tolist())


def test_without_the_field_pick_both_fields_show(tmp_path):
    """What the pick prevents (``first_field=False``): each frame scaled down holds both bars, a double image."""
    path = write_interlaced(tmp_path / "interlaced.mp4", bottom_first=False)
    for t, frame in enumerate(read_all(path, first_field=False)):
        top, bottom = bar_columns(t)
        columns = bright_columns(frame)
        assert columns.min() <= top + 1 and columns.max() >= bottom + BAR - 2, (t, columns.tolist())
