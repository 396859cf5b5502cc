"""Frames for `dora visualize`: clips spread evenly over a video file (PyAV) or a folder of frames (PIL).

Frames are resized so that their short side is ``image_size`` and centre-cropped to whole patches, as uint8
(T, 3, H, W); :func:`~dora_lightning.data.augment.colour_views.normalize_views` makes them network input.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from dora_lightning.data.decode_stats import DecodeStats
from dora_lightning.data.reader import RangeReader
from dora_lightning.data.sources import VideoInfo, VideoSourceError, probe_video
from dora_lightning.evaluation.images import natural_key
from dora_lightning.sizes import short_side_size

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


@dataclass(frozen=True)
class FrameSource:
    """A video file or a folder of frames (image files in natural name order), with its frame count and rate."""

    path: Path
    kind: Literal["video", "images"]
    num_frames: int
    fps: float | None
    video: VideoInfo | None = None
    images: tuple[Path, ...] = ()


def open_source(source: str | Path) -> FrameSource:
    """Recognise ``source`` as a folder of frames or a video file and read its length (probing the video)."""
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"'{path}' does not exist; give a video file or a folder of frames (--source)"
        )
    if path.is_dir():
        images = sorted(
            (p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES),
            key=natural_key,
        )
        if not images:
            raise VideoSourceError(
                f"the folder '{path}' holds no images ({', '.join(IMAGE_SUFFIXES)}); put the frames there as "
                "image files named in order, or give a video file"
            )
        return FrameSource(path, "images", len(images), None, images=tuple(images))
    try:
        info = probe_video(str(path))
    except VideoSourceError as err:
        raise VideoSourceError(f"{err}; give a video file FFmpeg can decode or a folder of frames") from err
    return FrameSource(path, "video", info.num_frames, float(info.fps), video=info)


def clip_starts(num_frames: int, span: int, num_clips: int) -> list[int]:
    """First frames of ``num_clips`` clips of ``span`` frames, each centred in its share of the video."""
    room = num_frames - span
    return [round(room * (2 * i + 1) / (2 * num_clips)) for i in range(num_clips)]


def resized_size(width: int, height: int, image_size: int) -> tuple[int, int]:
    """(width, height) after scaling so that the short side is ``image_size`` (up or down)."""
    return short_side_size(width, height, image_size)


def _centre_crop(images: list[np.ndarray], patch_size: int) -> Tensor:
    """Centre-crop (H, W, 3) uint8 frames to the largest common multiple of ``patch_size``: (T, 3, H', W') uint8."""
    height = min(i.shape[0] for i in images) // patch_size * patch_size
    width = min(i.shape[1] for i in images) // patch_size * patch_size
    crops = []
    for image in images:
        top, left = (image.shape[0] - height) // 2, (image.shape[1] - width) // 2
        crops.append(image[top : top + height, left : left + width])
    return torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).contiguous()


def _read_video_frames(info: VideoInfo, indices: list[int], size: tuple[int, int]) -> list[np.ndarray]:
    wanted, stats = set(indices), DecodeStats()
    reader = RangeReader(info, min(indices), max(indices) + 1, size, wanted.__contains__, stats)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        frames = {index: frame for index, frame in reader if frame is not None}
    missing = [i for i in indices if i not in frames]
    if missing:
        raise VideoSourceError(
            f"'{info.path}': could not decode frame(s) {missing} of {info.num_frames} ({stats.decode_errors} decode "
            "errors: the file is damaged there, or its header overstates its length); lower --clip_length, "
            "--frame_stride or --num_clips"
        )
    for warning in caught:  # errors the reader recovered from: the frames are there, say so once
        warnings.warn(str(warning.message), RuntimeWarning, stacklevel=3)
    return [frames[i] for i in indices]


def _read_image_frames(paths: list[Path], image_size: int) -> list[np.ndarray]:
    from PIL import Image, UnidentifiedImageError

    frames = []
    for path in paths:
        try:
            with Image.open(path) as image:
                rgb = image.convert("RGB")
        except (OSError, UnidentifiedImageError) as err:
            raise VideoSourceError(
                f"'{path}' is not a readable image ({err.__class__.__name__}); remove or replace it"
            ) from err
        size = resized_size(rgb.width, rgb.height, image_size)
        frames.append(np.asarray(rgb.resize(size, Image.Resampling.BILINEAR)))
    return frames


def read_frames(source: FrameSource, indices: list[int], image_size: int, patch_size: int) -> Tensor:
    """Frames ``indices`` of ``source``: short side resized to ``image_size``, centre-cropped to whole patches.

    Videos are decoded with PyAV (scaled at decode time), image files with PIL. Returns (T, 3, H, W) uint8.
    """
    if source.kind == "video":
        assert source.video is not None
        size = resized_size(source.video.width, source.video.height, image_size)
        images = _read_video_frames(source.video, indices, size)
    else:
        images = _read_image_frames([source.images[i] for i in indices], image_size)
    return _centre_crop(images, patch_size)
