"""Gaussian blur for the clip augmentation (spec section C), on groups of images with a sigma per image.

Two implementations of the same separable blur with reflect padding:

* :func:`gaussian_blur`: grouped (depthwise) oneDNN convolutions, float or uint8 in and out; the reference and
  the eager path.
* :func:`blur_rows` + :func:`blur_columns`: the blur as explicit weighted sums of shifted slices over pre-padded
  images, written so that ``torch.compile`` turns each pass into one vectorised loop (about 3x faster than the
  convolutions on a CPU, where the padding, layout copies and conversions around them cost more than they do).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["blur_columns", "blur_rows", "blur_radius", "gaussian_blur", "gaussian_kernels"]


def blur_radius(sigma_max: float, height: int, width: int) -> int:
    """The largest kernel radius a blur of sigma up to ``sigma_max`` uses on ``height x width`` images:
    ``ceil(3 sigma)``, at least 1, capped at ``min(height, width) - 1`` so that reflect padding fits (0 when an image
    is too small to blur)."""
    cap = min(height, width) - 1
    return 0 if cap < 1 else min(max(1, math.ceil(3.0 * sigma_max)), cap)


def gaussian_kernels(sigma: Tensor, radius_cap: int, width: int | None = None) -> Tensor:
    """(n, 2R + 1) normalised 1-D Gaussian kernels, float64 on the CPU, one per ``sigma`` (n,).

    Kernel i has radius ``ceil(3 sigma_i)`` clamped to [1, ``radius_cap``] (torchvision's kernel size rule) and is
    zero beyond it; R is the largest radius, or ``width`` (>= every radius) to get a fixed kernel length.
    """
    sigma = sigma.to(torch.float64).cpu()
    radius = torch.ceil(3.0 * sigma).clamp_(1, radius_cap)
    r_max = int(radius.max()) if width is None else width
    offsets = torch.arange(-r_max, r_max + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (offsets / sigma.view(-1, 1)) ** 2)
    kernel = kernel * (offsets.abs() <= radius.view(-1, 1))  # per-image kernel size
    return kernel / kernel.sum(dim=1, keepdim=True)


def gaussian_blur(img: Tensor, sigma: Tensor, out: Tensor | None = None) -> Tensor:
    """Blur (n, C, H, W) images with a separable Gaussian of per-image ``sigma`` (n,), reflect padding.

    ``img`` may be float or uint8. The result has ``out``'s dtype (``out``: optional, contiguous, may be ``img``
    itself; saves a copy) or else ``img``'s; a uint8 result is rounded half up (the blur is computed in float32).

    Image i uses kernel size 2 * ceil(3 * sigma_i) + 1, the radius capped at ``min(H, W) - 1`` so that reflect
    padding fits. All images go through one grouped (depthwise) convolution per direction.
    """
    n, c, height, width = img.shape
    cap = min(height, width) - 1
    if n == 0 or cap < 1:
        return img.clone() if out is None else out.copy_(img)
    compute = img.dtype if img.is_floating_point() else torch.float32
    kernel = gaussian_kernels(sigma, cap).to(device=img.device, dtype=compute)
    kernel = kernel.repeat_interleave(c, dim=0)  # (n * c, K)
    k = kernel.shape[1]
    r_max = k // 2
    # Depthwise convolutions are ~2x faster channels-last on CPU (oneDNN vectorises over channels).
    x = F.pad(img.reshape(1, n * c, height, width).to(compute), (r_max, r_max, r_max, r_max), mode="reflect")
    x = x.contiguous(memory_format=torch.channels_last)
    x = F.conv2d(x, kernel.view(n * c, 1, k, 1), groups=n * c)
    x = F.conv2d(x, kernel.view(n * c, 1, 1, k), groups=n * c)
    if out is None:
        out = torch.empty(img.shape, dtype=img.dtype, device=img.device)
    if not out.is_floating_point():
        x = x.add_(0.5)  # convex weights keep values in range: the cast's truncation rounds half up
    out.view(1, n * c, height, width).copy_(x)  # one copy from channels-last straight into ``out``
    return out


def blur_rows(padded: Tensor, kernel: Tensor) -> Tensor:
    """Horizontal pass: float32 (n, C, H', W' - K + 1) rows of ``padded`` (n, C, H', W', any dtype) convolved with
    each image's kernel (n, K), K odd (valid convolution: pad the images by K // 2 first)."""
    taps = kernel.shape[1]
    width = padded.shape[3] - taps + 1
    x = padded.to(torch.float32)
    weights = kernel.to(torch.float32).view(-1, 1, 1, 1, taps)
    acc = weights[..., 0] * x[..., 0:width]
    for k in range(1, taps):
        acc = acc + weights[..., k] * x[..., k : k + width]
    return acc


def blur_columns(rows: Tensor, kernel: Tensor) -> Tensor:
    """Vertical pass over :func:`blur_rows`' output: uint8 (n, C, H' - K + 1, W), rounded half up."""
    taps = kernel.shape[1]
    height = rows.shape[2] - taps + 1
    weights = kernel.to(torch.float32).view(-1, 1, 1, 1, taps)
    acc = weights[..., 0] * rows[:, :, 0:height]
    for k in range(1, taps):
        acc = acc + weights[..., k] * rows[:, :, k : k + height]
    return (acc + 0.5).to(torch.uint8)  # convex weights keep values in [0, 255]
