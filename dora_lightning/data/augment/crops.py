"""Cutting a clip's views out of its frames: the two CPU crop backends of :class:`ClipMultiCrop`
(``crop_backend`` ``roi_align`` and ``interpolate``) and the ``roi_align`` call the device renderer shares."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import roi_align

from dora_lightning.data.augment.crop_boxes import pixel_box

__all__ = ["crop_interpolate", "crop_roi_align", "roi_align_views"]


def roi_align_views(image: Tensor, rois: Tensor, size: int) -> Tensor:
    """``size x size`` views of ``image`` (N, C, H, W) float, one per row (index, x0, y0, x1, y1) of ``rois`` (K, 5),
    pixel-edge coordinates (any float dtype, any device: converted to ``image``'s), by bilinear ``roi_align`` with
    adaptive sampling (``ceil(box size / output size)`` samples per bin and direction, i.e. box-averaged when
    shrinking) and aligned pixel centres. Returns (K, C, size, size)."""
    rois = rois.to(dtype=image.dtype).to(image.device, non_blocking=True)
    return roi_align(
        image, rois, output_size=(size, size), spatial_scale=1.0, sampling_ratio=-1, aligned=True
    )


def crop_roi_align(
    frames: Tensor,
    pre_crop: Tensor,
    gboxes: Tensor,
    lboxes: Tensor,
    lframes: Tensor,
    global_size: int,
    local_size: int,
) -> tuple[Tensor, Tensor]:
    """Cut global views (boxes shared by all frames) and local views (box ``lboxes[i]`` of frame ``lframes[i]``)
    with roi_align. Returns float (G*T, 3, gs, gs) ordered (view, frame) and (K, 3, ls, ls), in [0, 255]."""
    T, height, width, _ = frames.shape
    G = gboxes.shape[0]
    # Convert only the part of the frames the crops can touch: the pre-crop plus a 1-pixel margin for the
    # bilinear neighbours, so roi_align sees exactly the pixels it would see on the full frame.
    px0, py0, px1, py1 = (int(v) for v in pre_crop.tolist())
    cx0, cy0 = max(px0 - 1, 0), max(py0 - 1, 0)
    cx1, cy1 = min(px1 + 1, width), min(py1 + 1, height)
    src = frames[:, cy0:cy1, cx0:cx1]
    image = torch.empty(T, 3, cy1 - cy0, cx1 - cx0, device=frames.device).copy_(src.permute(0, 3, 1, 2))
    shift = torch.tensor([cx0, cy0, cx0, cy0], dtype=torch.float64)

    # Global boxes are shared by all frames: cut each once from the (1, 3T, h, w) stack (roi_align's per-box
    # set-up is about half its cost). Output (G, 3T, s, s) is (G * T, 3, s, s) ordered (view, frame).
    rois = torch.cat([torch.zeros(G, 1, dtype=torch.float64), gboxes - shift], dim=1)
    stack = image.view(1, 3 * T, *image.shape[2:])
    gs, ls = global_size, local_size
    global_out = roi_align_views(stack, rois, gs).view(G * T, 3, gs, gs)
    local_rois = torch.cat([lframes.to(torch.float64).unsqueeze(1), lboxes - shift], dim=1)
    return global_out, roi_align_views(image, local_rois, ls)


def crop_interpolate(
    frames: Tensor | Sequence[Tensor],
    gboxes: Tensor,
    gflip: Tensor,
    lboxes: Tensor,
    lframes: Tensor,
    lflip: Tensor,
    dtype: torch.dtype,
    packed: bool,
    global_size: int,
    local_size: int,
) -> tuple[Tensor, Tensor]:
    """As :func:`crop_roi_align`, with uint8 antialiased bilinear interpolation of boxes rounded to whole
    frame pixels, and the flips (``gflip`` per global view, ``lflip`` per local image) applied. Values in [0, 255], contiguous (n, 3, s, s) of ``dtype``; with ``packed`` (RGBA frames),
    uint8 (n, s, s, 4) as the resampling writes them (no layout copy)."""
    T, (height, width, channels_in), device = len(frames), frames[0].shape, frames[0].device
    gs, ls = global_size, local_size

    def region(t0: int, t1: int, x0: int, y0: int, x1: int, y1: int) -> Tensor:
        """uint8 (t1 - t0, C, h, w) channels-last view of frames t0..t1-1's box (a stack of just the box for a
        list of frames): the fast uint8 path of F.interpolate."""
        if isinstance(frames, Tensor):
            crop = frames[t0:t1, y0:y1, x0:x1]
        elif t1 - t0 == 1:
            crop = frames[t0][y0:y1, x0:x1].unsqueeze(0)
        else:
            crop = torch.stack([frame[y0:y1, x0:x1] for frame in frames[t0:t1]])
        return crop.permute(0, 3, 1, 2)

    def resize(crop: Tensor, size: int) -> Tensor:
        """uint8 (n, C, h, w) -> uint8 (n, size, size, C)."""
        out = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        return out.permute(0, 2, 3, 1)  # a plain view: the output is channels-last

    def to_planar(pixels: Tensor, out: Tensor) -> Tensor:
        """Copy the RGB of uint8 (n, s, s, C) pixels into ``out`` (n, 3, s, s) of ``dtype``."""
        return out.copy_(pixels[..., :3].permute(0, 3, 1, 2))

    crops = []
    for v, box in enumerate(gboxes.tolist()):
        x0, y0, x1, y1 = pixel_box(box, height, width)
        crop = resize(region(0, T, x0, y0, x1, y1), gs)
        # flip the uint8 crop: a quarter of the bytes of the float view
        crops.append(crop.flip(2) if bool(gflip[v]) else crop)
    if packed:  # the crops are contiguous (T, s, s, C) already
        global_out = crops[0] if len(crops) == 1 else torch.cat(crops)
    else:
        global_out = torch.empty(len(crops) * T, 3, gs, gs, dtype=dtype, device=device)
        for v, crop in enumerate(crops):
            to_planar(crop, global_out[v * T : (v + 1) * T])
    hwc = torch.empty(lboxes.shape[0], ls, ls, channels_in, dtype=torch.uint8, device=device)
    for i, (box, t, flip) in enumerate(zip(lboxes.tolist(), lframes.tolist(), lflip.tolist(), strict=True)):
        x0, y0, x1, y1 = pixel_box(box, height, width)
        crop = resize(region(t, t + 1, x0, y0, x1, y1), ls)[0]
        hwc[i] = crop.flip(1) if flip else crop
    if packed:
        return global_out, hwc
    local_out = torch.empty(lboxes.shape[0], 3, ls, ls, dtype=dtype, device=device)
    return global_out, to_planar(hwc, local_out)
