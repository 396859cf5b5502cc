"""Pictures of what the model attends to and tracks: image grids from tensors (for TensorBoard and PNG files)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.utils import make_grid

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OBJECT_COLOURS = (
    (1.0, 0.2, 0.2),
    (0.2, 1.0, 0.2),
    (0.3, 0.5, 1.0),
    (1.0, 1.0, 0.2),
    (1.0, 0.3, 1.0),
    (0.2, 1.0, 1.0),
)


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


def track_grid(frames: Tensor, masks: Tensor) -> Tensor:
    """One clip's frames (T, 3, H, W, normalised) on the first row, then one row per tracked object with its mask.

    ``masks`` is (k, T, gh, gw); returns a (3, H', W') image in [0, 1].
    """
    images = denormalize(frames.float().cpu())
    rows = [images]
    for obj, obj_masks in enumerate(masks.cpu()):
        rows.append(overlay(images, obj_masks.float(), OBJECT_COLOURS[obj % len(OBJECT_COLOURS)]))
    return make_grid(torch.cat(rows), nrow=images.shape[0], padding=2, pad_value=1.0)


def attention_grid(frame: Tensor, cls_attention: Tensor, grid: tuple[int, int]) -> Tensor:
    """A frame (3, H, W, normalised) and, per head, its last-layer CLS attention over patches (h, N) as an overlay."""
    image = denormalize(frame.float().cpu())[None]
    heads = normalise_maps(cls_attention.float().cpu()).view(-1, *grid)
    tiles = [image] + [overlay(image, head[None], (1.0, 0.1, 0.1), alpha=0.8) for head in heads]
    return make_grid(torch.cat(tiles), nrow=len(tiles), padding=2, pad_value=1.0)
