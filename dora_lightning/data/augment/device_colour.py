"""The ``"fused"`` colour backend for the device renderer, without reading anything back from the device.

:func:`~dora_lightning.data.augment.colour_views.colour_views` computes the colour maps' offsets, the blur kernels and the
normalisation constants on the CPU from values it copies there and back with blocking copies; on a CUDA device each
such copy waits for the device's queue to drain (the previous training step included). Here the per-image decisions
and parameters stay on the CPU (they come from the plan, drawn on the CPU), every host-to-device copy is
non-blocking and the one device-dependent quantity, each image's mean grey level, stays on the device. The arithmetic
is ``colour_views``' op for op, so on the CPU device the results are identical (tests/test_device_augment.py).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from dora_lightning.data.augment.blur import gaussian_kernels
from dora_lightning.data.augment.colour_ops import _RGB_TO_YIQ, apply_colour_affine, colour_matrix, solarize
from dora_lightning.data.augment.colour_views import (
    BLUR_DRAW,
    ColourSettings,
    _jitter_factors,
    _parameters,
    normalize_views,
)

__all__ = ["fused_colour_views"]

_HIGH = 255.0  # the renderer's views are float in [0, 255]


def _to(t: Tensor, device: torch.device, dtype: torch.dtype | None = None) -> Tensor:
    """``t`` (a CPU tensor) converted on the CPU, then copied to ``device`` without waiting for it."""
    return (t if dtype is None else t.to(dtype)).to(device, non_blocking=True)


def _apply(img: Tensor, mask: Tensor, fn: Callable[[Tensor, Tensor], Tensor], sigma: Tensor) -> None:
    """``colour_views._apply`` with one chunk and CPU ``mask`` / per-image ``sigma``: replace the images of ``img``
    that ``mask`` selects with ``fn(images, their sigmas)``, in place where the selection is contiguous."""
    idx = mask.nonzero().squeeze(1)
    count = idx.numel()
    if count == 0:
        return
    first = int(idx[0])
    if int(idx[-1]) - first + 1 == count:
        part = img[first : first + count]
        part.copy_(fn(part, sigma[first : first + count]))
    else:
        on_device = _to(idx, img.device)
        img.index_copy_(0, on_device, fn(img.index_select(0, on_device), sigma.index_select(0, idx)))


def _blur(img: Tensor, sigma: Tensor) -> Tensor:
    """``blur.gaussian_blur`` of float images (n, C, H, W) with per-image CPU ``sigma`` (n,): its kernels are
    made on the CPU and copied without a wait. Returns a new float tensor."""
    n, c, height, width = img.shape
    cap = min(height, width) - 1
    if n == 0 or cap < 1:
        return img.clone()
    kernel = _to(gaussian_kernels(sigma, cap), img.device, img.dtype).repeat_interleave(c, dim=0)
    k = kernel.shape[1]
    r_max = k // 2
    x = F.pad(img.reshape(1, n * c, height, width), (r_max, r_max, r_max, r_max), mode="reflect")
    x = x.contiguous(memory_format=torch.channels_last)
    x = F.conv2d(x, kernel.view(n * c, 1, k, 1), groups=n * c)
    x = F.conv2d(x, kernel.view(n * c, 1, 1, k), groups=n * c)
    return x.view(n, c, height, width)


def fused_colour_views(
    img: Tensor, u: Tensor, blur_prob: float | Tensor, s: ColourSettings, solarized: Tensor | None
) -> Tensor:
    """``colour_views(img, 255.0, u, order, blur_prob, s, solarized=solarized)`` for ``s.backend == "fused"``:
    float32 views (N, 3, S, S) in [0, 255] on any device (modified in place); ``u`` (N, NUM_DRAWS), a tensor
    ``blur_prob`` (N,) and ``solarized`` (N,) on the CPU. Returns uint8 views or float32 normalised ones
    (``s.output_dtype``)."""
    if img.shape[0] == 0:
        return img.to(torch.uint8 if s.output_dtype == "uint8" else torch.float32)
    device = img.device
    params = _parameters(u, s).to(torch.float32)  # on the CPU, the values colour_views copies to the device
    factors, jittered, grey = _jitter_factors(params, u, s)
    if bool((jittered | grey).any()):  # colour_affine, with the offsets computed on the device
        matrix, mean_coef = colour_matrix(*factors.unbind(1), grey)
        mean_grey = img.mean(dim=(-2, -1)).to(torch.float64) @ _to(_RGB_TO_YIQ[0], device)
        bias = (_to(mean_coef, device, torch.float64) * mean_grey).view(-1, 1).expand(-1, 3)
        img = apply_colour_affine(img, _to(matrix, device), bias.to(torch.float32), _HIGH)
    _apply(img, u[:, BLUR_DRAW] < blur_prob, _blur, params[:, 4])
    if solarized is not None:
        _apply(img, solarized, lambda x, _: solarize(x, _HIGH), params[:, 4])
    if s.output_dtype == "uint8":
        return img.add_(0.5).to(torch.uint8)  # values stay in [0, 255]: rounding half up needs no clamp
    return normalize_views(img.mul_(1.0 / _HIGH), s.mean, s.std, scale=1.0)
