"""Frames of the video the synthetic data sets paint their shapes on (:mod:`dora_lightning.evaluation.synthetic`),
read with PyAV: its frame count and chosen frames, resized (HDR videos tone-mapped to SDR, as the training reader
does)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from dora_lightning.data.datamodule import DEFAULT_VIDEO  # the bundled video, relative to the repository
from dora_lightning.data.reader import frame_to_rgb, frame_tone_map, stream_colour
from dora_lightning.data.video_file import main_video_stream, open_video

__all__ = ["DEFAULT_VIDEO", "read_video_frames", "video_frame_count"]

_REPO = Path(__file__).resolve().parents[2]


def _resolve_video(video: str | Path) -> Path:
    path = Path(video)
    if not path.is_absolute() and not path.exists() and (_REPO / path).exists():
        path = _REPO / path
    if not path.is_file():
        raise FileNotFoundError(
            f"video '{video}' not found; pass video= a readable video file (default {DEFAULT_VIDEO})"
        )
    return path


def video_frame_count(video: str | Path) -> int:
    """Number of frames of ``video`` (from the container, else by decoding it once)."""
    path = _resolve_video(video)
    with open_video(path) as container:
        stream = main_video_stream(container)
        count = stream.frames
        if count <= 0:
            count = sum(1 for _ in container.decode(stream))
    if count <= 0:
        raise ValueError(f"video '{path}' has no decodable frame")
    return int(count)


def read_video_frames(
    video: str | Path, indices: Sequence[int], size: tuple[int, int]
) -> dict[int, np.ndarray]:
    """Decode the frames ``indices`` of ``video`` (taken modulo its frame count) as RGB uint8 (H, W, 3) of ``size``.

    The video is decoded once, sequentially; frames are resized (bilinear) to ``size`` = (H, W), HDR ones
    tone-mapped to SDR first (:func:`~dora_lightning.data.reader.frame_to_rgb`). Returns ``{requested index: frame}``.
    """
    path = _resolve_video(video)
    count = video_frame_count(path)
    wanted = {int(i) for i in indices}
    frames: dict[int, np.ndarray] = {}
    with open_video(path) as container:
        stream = main_video_stream(container)
        tags = stream_colour(stream)
        for position, frame in enumerate(container.decode(stream)):
            hits = [i for i in wanted if i % count == position]
            if hits:
                rgb = frame_to_rgb(frame, frame.width, frame.height, "rgb24", frame_tone_map(frame, tags))
                image = Image.fromarray(rgb).resize((size[1], size[0]), Image.BILINEAR)
                frames.update({i: np.asarray(image, dtype=np.uint8) for i in hits})
            if len(frames) == len(wanted):
                break
    if len(frames) != len(wanted):
        raise ValueError(f"video '{path}': could not decode frame(s) {sorted(wanted - set(frames))[:5]}")
    return frames
