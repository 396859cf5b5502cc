"""Pictures of what the model attends to and tracks: image grids from tensors (for TensorBoard and PNG files).

The grid functions (:func:`track_grid`, :func:`attention_grid`, :func:`attention_rows`) return (3, H, W) float images
in [0, 1]; ``DoRAModule`` logs them to TensorBoard during ``fit`` and ``dora visualize`` writes the same images as PNG
files (:func:`save_png` quantises them exactly as TensorBoard's ``add_image`` does) and the tracks as an MP4
(:func:`tracks_overlay`, :func:`write_mp4`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.utils import make_grid

from dora_lightning.data.video_file import open_video
from dora_lightning.imagenet import IMAGENET_MEAN, IMAGENET_STD

OBJECT_COLOURS = (
    (1.0, 0.2, 0.2),
    (0.2, 1.0, 0.2),
    (0.3, 0.5, 1.0),
    (1.0, 1.0, 0.2),
    (1.0, 0.3, 1.0),
    (0.2, 1.0, 1.0),
)
ATTENTION_COLOUR = (1.0, 0.1, 0.1)
GRID_PADDING = 2  # pixels of white between the tiles of every grid
VIDEO_CODECS = ("libx264", "mpeg4")  # tried in this order by :func:`video_codec`


def denormalize(
    images: Tensor, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> Tensor:
    """Undo ImageNet normalisation of (..., 3, H, W) images and clamp to [0, 1]."""
    m = torch.tensor(mean, dtype=images.dtype, device=images.device).view(3, 1, 1)
    s = torch.tensor(std, dtype=images.dtype, device=images.device).view(3, 1, 1)
    return (images * s + m).clamp(0, 1)


def overlay(images: Tensor, heat: Tensor, colour: Sequence[float], alpha: float = 0.6) -> Tensor:
    """Blend a per-pixel heat map (N, h, w) in [0, 1], upsampled to the images (N, 3, H, W), in ``colour``."""
    heat = F.interpolate(heat[:, None].float(), size=images.shape[-2:], mode="nearest")
    tint = torch.tensor(colour, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return images * (1 - alpha * heat) + tint * alpha * heat


def normalise_maps(maps: Tensor) -> Tensor:
    """Min-max normalise each map of (N, ...) to [0, 1]."""
    flat = maps.flatten(1).float()
    low, high = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
    return ((flat - low) / (high - low).clamp_min(1e-12)).view_as(maps)


def object_colour(index: int) -> tuple[float, float, float]:
    """The RGB colour (in [0, 1]) of tracked object ``index`` in every picture (the palette repeats after 6)."""
    return OBJECT_COLOURS[index % len(OBJECT_COLOURS)]


def track_grid(frames: Tensor, masks: Tensor) -> Tensor:
    """One clip's frames (T, 3, H, W, normalised) on the first row, then one row per tracked object with its mask.

    ``masks`` is (k, T, gh, gw); returns a (3, H', W') image in [0, 1].
    """
    images = denormalize(frames.float().cpu())
    rows = [images]
    for obj, obj_masks in enumerate(masks.cpu()):
        rows.append(overlay(images, obj_masks.float(), object_colour(obj)))
    return make_grid(torch.cat(rows), nrow=images.shape[0], padding=GRID_PADDING, pad_value=1.0)


def _attention_tiles(frame: Tensor, cls_attention: Tensor, grid: tuple[int, int]) -> Tensor:
    """(1 + h, 3, H, W): the frame, then each head's min-max normalised CLS attention overlaid on it."""
    image = denormalize(frame.float().cpu())[None]
    heads = normalise_maps(cls_attention.float().cpu()).view(-1, *grid)
    return torch.cat([image] + [overlay(image, head[None], ATTENTION_COLOUR, alpha=0.8) for head in heads])


def attention_grid(frame: Tensor, cls_attention: Tensor, grid: tuple[int, int]) -> Tensor:
    """A frame (3, H, W, normalised) and, per head, its last-layer CLS attention over patches (h, N) as an overlay."""
    tiles = _attention_tiles(frame, cls_attention, grid)
    return make_grid(tiles, nrow=len(tiles), padding=GRID_PADDING, pad_value=1.0)


def attention_rows(frames: Tensor, cls_attention: Tensor, grid: tuple[int, int]) -> Tensor:
    """:func:`attention_grid` for every frame of a clip, one row per frame: frames (T, 3, H, W), attention (T, h, N).

    Row 0 is exactly ``attention_grid(frames[0], cls_attention[0], grid)`` (the image TensorBoard shows during fit).
    """
    if frames.shape[0] != cls_attention.shape[0]:
        raise ValueError(
            f"frames (T, 3, H, W) = {tuple(frames.shape)} and cls_attention (T, h, N) = "
            f"{tuple(cls_attention.shape)} disagree on T"
        )
    tiles = [
        _attention_tiles(frame, attention, grid)
        for frame, attention in zip(frames, cls_attention, strict=True)
    ]
    return make_grid(torch.cat(tiles), nrow=tiles[0].shape[0], padding=GRID_PADDING, pad_value=1.0)


def tracks_overlay(frames: Tensor, masks: Tensor, alpha: float = 0.5) -> Tensor:
    """Every frame (T, 3, H, W, normalised) with all k object masks (k, T, gh, gw) overlaid in their colours.

    Objects are blended one after the other in :func:`object_colour` order (where masks overlap, later objects show
    on top). Returns (T, 3, H, W) in [0, 1].
    """
    images = denormalize(frames.float().cpu())
    for obj, obj_masks in enumerate(masks.cpu()):
        images = overlay(images, obj_masks.float(), object_colour(obj), alpha=alpha)
    return images.clamp(0, 1)


def to_uint8(image: Tensor) -> np.ndarray:
    """A (3, H, W) image in [0, 1] as an (H, W, 3) uint8 array, quantised as TensorBoard's ``add_image`` does."""
    array = image.detach().float().cpu().permute(1, 2, 0).numpy()
    return (array * 255.0).clip(0, 255).astype(np.uint8)


def save_png(image: Tensor, path: str | Path) -> Path:
    """Write a (3, H, W) image in [0, 1] as a PNG file (the same pixels TensorBoard shows); returns ``path``."""
    from PIL import Image

    path = Path(path)
    partial = path.with_name(f".{path.name}.partial")
    Image.fromarray(to_uint8(image)).save(partial, format="PNG")
    os.replace(partial, path)
    return path


def video_codec() -> str:
    """The first of :data:`VIDEO_CODECS` that the installed PyAV (FFmpeg) can encode with."""
    import av

    for name in VIDEO_CODECS:
        try:
            av.codec.Codec(name, "w")
        except (av.FFmpegError, ValueError):
            continue
        return name
    raise RuntimeError(
        f"the installed PyAV {av.__version__} has none of the video encoders {', '.join(VIDEO_CODECS)}; "
        "install a PyAV wheel with FFmpeg's encoders (pip install av)"
    )


def write_mp4(frames: Tensor, path: str | Path, fps: float, codec: str | None = None) -> str:
    """Write frames (T, 3, H, W) in [0, 1] (or uint8, written as they are) as an MP4 at ``fps`` frames per second;
    returns the codec used.

    yuv420p needs even sizes, so an odd height or width gets one black row or column at the bottom or right.
    """
    import av

    codec = codec or video_codec()
    images = frames.detach().cpu()
    if images.dtype != torch.uint8:
        images = images.float()
    height, width = images.shape[-2:]
    images = F.pad(images, (0, width % 2, 0, height % 2))
    path = Path(path)
    partial = path.with_name(f".{path.name}.partial")
    with open_video(partial, "w", format="mp4") as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1000))
        stream.width, stream.height, stream.pix_fmt = images.shape[-1], images.shape[-2], "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": "18", "preset": "medium"}
        else:
            stream.bit_rate = 8_000_000  # mpeg4's default (~200 kb/s) blurs thin mask edges
        for image in images:
            pixels = (
                image.permute(1, 2, 0).contiguous().numpy() if image.dtype == torch.uint8 else to_uint8(image)
            )
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    os.replace(partial, path)
    return codec
