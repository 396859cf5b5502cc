"""Crop geometry of the clip augmentation (spec section C): RandomResizedCrop boxes, sampled and composed analytically.

Every box is drawn with torchvision's RandomResizedCrop algorithm, vectorised over all boxes of a clip, from a
``torch.Generator``; the view boxes (in pre-crop coordinates) are composed with the pre-crop into frame coordinates,
so each view can be resampled from the frame once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "CROP_ATTEMPTS",
    "CROP_RATIO",
    "ClipBoxes",
    "pixel_box",
    "sample_clip_boxes",
    "sample_resized_crop_boxes",
]

# Aspect-ratio range of every RandomResizedCrop in DINO/DoRA (torchvision's default).
CROP_RATIO: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
# torchvision's RandomResizedCrop tries this many random boxes before falling back to a centre crop.
CROP_ATTEMPTS = 10


def sample_resized_crop_boxes(
    uniforms: Tensor,
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float] = CROP_RATIO,
) -> Tensor:
    """Sample RandomResizedCrop boxes for an ``height x width`` image, vectorised over many boxes.

    Follows torchvision's algorithm: per attempt, area = image area * U(scale), aspect ratio log-uniform in ``ratio``,
    w/h rounded to integers; the first attempt that fits is placed uniformly at an integer position. If none of the
    attempts fits, a centre crop with the aspect ratio clamped to ``ratio`` is used.

    Args:
        uniforms: (n, attempts, 4) values in [0, 1) (area, log-ratio, top, left draws for each attempt).
        height, width: image size in pixels.
        scale: (lo, hi) fraction of the image area.
        ratio: (lo, hi) aspect ratio w/h range.

    Returns:
        (n, 4) float64 boxes (x0, y0, x1, y1) in pixel-edge coordinates (integers), inside the image.
    """
    u = uniforms.to(torch.float64)
    area = float(height * width)
    target_area = area * (scale[0] + (scale[1] - scale[0]) * u[..., 0])
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u[..., 1])
    w = torch.round(torch.sqrt(target_area * aspect))
    h = torch.round(torch.sqrt(target_area / aspect))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    # Integer top/left uniform in [0, size - crop]; the clamp guards against u * n rounding up to n.
    top = torch.minimum(torch.floor(u[..., 2] * (height - h + 1)), height - h)
    left = torch.minimum(torch.floor(u[..., 3] * (width - w + 1)), width - w)

    first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)  # index of the first fitting attempt (0 if none)
    w, h, top, left = (t.gather(1, first).squeeze(1) for t in (w, h, top, left))

    # Fallback: centre crop of the whole image with its aspect ratio clamped into ``ratio``.
    in_ratio = width / height
    if in_ratio < ratio[0]:
        fw, fh = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        fw, fh = int(round(height * ratio[1])), height
    else:
        fw, fh = width, height
    ok = fits.any(dim=1)
    w = torch.where(ok, w, float(fw))
    h = torch.where(ok, h, float(fh))
    top = torch.where(ok, top, float((height - fh) // 2))
    left = torch.where(ok, left, float((width - fw) // 2))
    return torch.stack([left, top, left + w, top + h], dim=1)


@dataclass(frozen=True)
class ClipBoxes:
    """Crop geometry of one clip.

    ``pre_crop`` is in frame pixels; the view boxes are in the coordinates of the pre-crop region, a
    ``region_size = (height, width)`` image (``(pre_crop_size, pre_crop_size)``, or the frame size when there is no
    pre-crop). All boxes are (x0, y0, x1, y1) pixel edges, float64.
    """

    frame_size: tuple[int, int]
    pre_crop: Tensor  # (4,)
    region_size: tuple[int, int]
    global_boxes: Tensor  # (G, 4), shared by all frames
    global_flip: Tensor  # (G,) bool, shared by all frames
    local_boxes: Tensor  # (L, T, 4), one per local view and frame

    def to_frame(self, boxes: Tensor) -> Tensor:
        """Map boxes (..., 4) from pre-crop-region coordinates to frame pixel coordinates."""
        x0, y0, x1, y1 = self.pre_crop.tolist()
        sx = (x1 - x0) / self.region_size[1]
        sy = (y1 - y0) / self.region_size[0]
        scale = boxes.new_tensor([sx, sy, sx, sy])
        offset = boxes.new_tensor([x0, y0, x0, y0])
        return boxes * scale + offset


def sample_clip_boxes(
    T: int,
    height: int,
    width: int,
    generator: torch.Generator,
    *,
    num_global: int,
    num_local: int,
    pre_crop_size: int | None,
    pre_crop_scale: tuple[float, float],
    global_scale: tuple[float, float],
    local_scale: tuple[float, float],
    global_flip_prob: float,
) -> ClipBoxes:
    """Draw the crop geometry of a clip of ``T`` frames of ``height x width`` (see :class:`ClipBoxes`).

    One pre-crop box (``pre_crop_size=None``: the whole frame), ``num_global`` global boxes with their flips (shared
    by all frames) and ``num_local`` local boxes per frame. All values come from a single ``torch.rand`` call whose
    size does not depend on the probabilities, so e.g. changing ``global_flip_prob`` leaves every other draw unchanged.
    """
    G, L = num_global, num_local
    n_boxes = 1 + G + L * T
    u = torch.rand(n_boxes * CROP_ATTEMPTS * 4 + G, generator=generator, dtype=torch.float64)
    u_boxes = u[: n_boxes * CROP_ATTEMPTS * 4].view(n_boxes, CROP_ATTEMPTS, 4)
    u_flip = u[n_boxes * CROP_ATTEMPTS * 4 :]

    if pre_crop_size is None:
        pre_crop = torch.tensor([0.0, 0.0, float(width), float(height)], dtype=torch.float64)
        region = (height, width)
    else:
        pre_crop = sample_resized_crop_boxes(u_boxes[:1], height, width, pre_crop_scale)[0]
        region = (pre_crop_size, pre_crop_size)
    global_boxes = sample_resized_crop_boxes(u_boxes[1 : 1 + G], *region, global_scale)
    local_boxes = sample_resized_crop_boxes(u_boxes[1 + G :], *region, local_scale).view(L, T, 4)
    return ClipBoxes(
        frame_size=(height, width),
        pre_crop=pre_crop,
        region_size=region,
        global_boxes=global_boxes,
        global_flip=u_flip < global_flip_prob,
        local_boxes=local_boxes,
    )


def pixel_box(box: Sequence[float], height: int, width: int) -> tuple[int, int, int, int]:
    """Round a frame box (x0, y0, x1, y1) to whole pixel edges, clamped to the frame and at least 1 pixel wide/high."""
    x0, y0, x1, y1 = (math.floor(v + 0.5) for v in box)
    x0, y0 = min(max(x0, 0), width - 1), min(max(y0, 0), height - 1)
    return x0, y0, min(max(x1, x0 + 1), width), min(max(y1, y0 + 1), height)
