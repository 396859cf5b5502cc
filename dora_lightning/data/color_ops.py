"""Colour ops for the clip augmentation (spec section C): grayscale, HSV, colour jitter and Gaussian blur.

They work on groups of float images (n, 3, H, W) in [0, 1] with per-image parameters (n,), so one call handles many
views/frames at once; no PIL, no per-image Python loops. The ``*_`` functions work in place (and return ``img``):
on CPU, avoiding allocations and boolean masks roughly halves their cost, so everything here is plain float
arithmetic.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "adjust_brightness_",
    "adjust_contrast_",
    "adjust_hue_",
    "adjust_saturation_",
    "apply_colour_affine",
    "colour_affine",
    "gaussian_blur",
    "hsv_to_rgb",
    "rgb_to_grayscale",
    "rgb_to_hsv",
]

# ITU-R 601 luma weights, as PIL's convert("L") used by the official code (torchvision uses 0.2989 for R).
_LUMA = (0.299, 0.587, 0.114)


def rgb_to_grayscale(img: Tensor) -> Tensor:
    """Luma 0.299 R + 0.587 G + 0.114 B of (..., 3, H, W) images, as (..., 1, H, W)."""
    r, g, b = img.unbind(-3)
    return torch.mul(r, _LUMA[0]).add_(g, alpha=_LUMA[1]).add_(b, alpha=_LUMA[2]).unsqueeze(-3)


def _per_image(factor: Tensor, img: Tensor) -> Tensor:
    return factor.to(device=img.device, dtype=img.dtype).view(-1, *([1] * (img.dim() - 1)))


def _blend_(img: Tensor, grey: Tensor, factor: Tensor) -> Tensor:
    """In place: ``factor * img + (1 - factor) * grey`` per image (``grey`` broadcasts to ``img``), clamp."""
    return img.lerp_(grey.expand_as(img), 1.0 - _per_image(factor, img)).clamp_(0.0, 1.0)


def adjust_brightness_(img: Tensor, factor: Tensor) -> Tensor:
    """In place: multiply each image by its ``factor``, clamp to [0, 1]."""
    return img.mul_(_per_image(factor, img)).clamp_(0.0, 1.0)


def adjust_contrast_(img: Tensor, factor: Tensor) -> Tensor:
    """In place: blend each image with its mean grey level (``factor`` 0 = flat grey, 1 = unchanged), clamp."""
    channel_mean = img.mean(dim=(-2, -1))  # (n, 3); the grey mean is the luma of the channel means
    grey_mean = (channel_mean * channel_mean.new_tensor(_LUMA)).sum(dim=1)
    weights = (1.0 - _per_image(factor, img)).view(-1).tolist()  # _blend_'s float32 weights, as Python floats
    # One lerp per image with a scalar weight: a lerp whose ``end`` and ``weight`` are both broadcast per image is not
    # vectorised on CPU (~3x slower). Same arithmetic, so the same result as ``_blend_``.
    for image, grey, weight in zip(img, grey_mean, weights, strict=True):
        image.lerp_(grey.expand_as(image), weight)
    return img.clamp_(0.0, 1.0)


def adjust_saturation_(img: Tensor, factor: Tensor) -> Tensor:
    """In place: blend each image with its grayscale version (``factor`` 0 = grey, 1 = unchanged), clamp."""
    return _blend_(img, rgb_to_grayscale(img), factor)


def _hue_min_max(img: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Return (hue in sectors, min, max, chroma) of (..., 3, H, W) images, each (..., H, W).

    Hue is in units of 60 degrees, in [-1, 5) (callers wrap it); it is 0 where chroma is 0. Branch-free: the sector
    formula of the max channel is selected with float 0/1 indicators (R wins ties, then G; tied formulas agree).
    """
    r, g, b = img.unbind(-3)
    maxc = torch.maximum(r, g)
    torch.maximum(maxc, b, out=maxc)
    minc = torch.minimum(r, g)
    torch.minimum(minc, b, out=minc)
    chroma = torch.sub(maxc, minc)
    is_r = torch.eq(r, maxc, out=torch.empty_like(maxc))
    is_g = torch.eq(g, maxc, out=torch.empty_like(maxc))
    hue = torch.sub(r, g).add_(chroma, alpha=4.0)  # hue * chroma if B is the max
    hue.lerp_(torch.sub(b, r).add_(chroma, alpha=2.0), is_g)  # ... if G is
    hue.lerp_(torch.sub(g, b), is_r)  # ... if R is
    hue.div_(chroma.clamp_min(1e-12))
    return hue, minc, maxc, chroma


def _rgb_from_hue_(out: Tensor, hue: Tensor, minc: Tensor, maxc: Tensor, chroma: Tensor) -> Tensor:
    """Write the RGB image with the given hue (sectors, any real value; clobbered), min, max and chroma to ``out``.

    With h wrapped into [0, 6) and ramp(a) = clamp(|h - a| - 1, 0, 1), the HSV hexagon is
    R = min + chroma * ramp(3), G = max - chroma * ramp(2), B = max - chroma * ramp(4).
    """
    turns = torch.mul(hue, 1.0 / 6.0).floor_()
    hue.add_(turns, alpha=-6.0)
    for channel, centre, base, sign in zip(
        out.unbind(-3), (3.0, 2.0, 4.0), (minc, maxc, maxc), (1.0, -1.0, -1.0), strict=True
    ):
        torch.sub(hue, centre, out=channel).abs_().sub_(1.0).clamp_(0.0, 1.0)
        torch.addcmul(base, channel, chroma, value=sign, out=channel)
    return out


def rgb_to_hsv(img: Tensor) -> Tensor:
    """Convert (..., 3, H, W) RGB in [0, 1] to HSV, all channels in [0, 1] (hue as a fraction of a turn)."""
    hue, _, value, chroma = _hue_min_max(img)
    hue = hue.div_(6.0).remainder_(1.0)
    sat = chroma / value.clamp_min(1e-12)
    return torch.stack([hue, sat, value], dim=-3)


def hsv_to_rgb(img: Tensor) -> Tensor:
    """Convert (..., 3, H, W) HSV (all channels in [0, 1]) back to RGB in [0, 1]."""
    h, s, v = img.unbind(-3)
    chroma = s * v
    return _rgb_from_hue_(torch.empty_like(img), h * 6.0, v - chroma, v, chroma)


def adjust_hue_(img: Tensor, shift: Tensor) -> Tensor:
    """In place: rotate the HSV hue of each (3, H, W) image by its ``shift`` (a fraction of a turn)."""
    hue, minc, maxc, chroma = _hue_min_max(img)
    hue.add_(_per_image(shift * 6.0, hue))
    return _rgb_from_hue_(img, hue, minc, maxc, chroma)


def gaussian_blur(img: Tensor, sigma: Tensor, out: Tensor | None = None) -> Tensor:
    """Blur (n, C, H, W) images with a separable Gaussian of per-image ``sigma`` (n,), reflect padding.

    ``out`` (optional, contiguous, may be ``img`` itself) receives the result, saving a copy.

    Image i uses kernel size 2 * ceil(3 * sigma_i) + 1, the radius capped at ``min(H, W) - 1`` so that reflect
    padding fits. All images go through one grouped (depthwise) convolution per direction.
    """
    n, c, height, width = img.shape
    cap = min(height, width) - 1
    if n == 0 or cap < 1:
        return img.clone() if out is None else out.copy_(img)
    sigma = sigma.to(torch.float64).cpu()
    radius = torch.ceil(3.0 * sigma).clamp_(1, cap)
    r_max = int(radius.max())
    offsets = torch.arange(-r_max, r_max + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (offsets / sigma.view(-1, 1)) ** 2)
    kernel = kernel * (offsets.abs() <= radius.view(-1, 1))  # per-image kernel size
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).to(device=img.device, dtype=img.dtype)
    kernel = kernel.repeat_interleave(c, dim=0)  # (n * c, K)
    k = kernel.shape[1]
    x = F.pad(img.reshape(1, n * c, height, width), (r_max, r_max, r_max, r_max), mode="reflect")
    # Depthwise convolutions are ~2x faster channels-last on CPU (oneDNN vectorises over channels).
    x = x.contiguous(memory_format=torch.channels_last)
    x = F.conv2d(x, kernel.view(n * c, 1, k, 1), groups=n * c)
    x = F.conv2d(x, kernel.view(n * c, 1, 1, k), groups=n * c)
    if out is None:
        return x.reshape(n, c, height, width)
    out.view(1, n * c, height, width).copy_(x)  # one copy from channels-last straight into ``out``
    return out


# -- fused colour jitter: the whole jitter + grayscale chain as one affine map per image ---------------------------

# RGB -> YIQ (NTSC); its Y row is _LUMA, so saturation (a blend with luma grey) scales I and Q, and a hue shift
# rotates them.
_RGB_TO_YIQ = torch.tensor(
    [[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], dtype=torch.float64
)


def colour_affine(
    brightness: Tensor,
    contrast: Tensor,
    saturation: Tensor,
    hue: Tensor,
    grayscale: Tensor,
    channel_mean: Tensor,
) -> tuple[Tensor, Tensor]:
    """The per-image affine colour map ``x -> A x + b`` equal to jitter followed by optional grayscale.

    Brightness (factor), contrast (blend with the luma of the image mean), saturation (blend with luma grey) and
    hue (rotation of the YIQ chroma plane by ``-2 pi shift``, the YIQ approximation of an HSV hue shift used by
    e.g. NVIDIA DALI; a positive shift turns red towards yellow as in HSV) are all affine and, without the
    intermediate clamps of the exact ops, commute, so their order does not matter. ``grayscale`` (bool, n) appends
    the luma projection. An image with factors (1, 1, 1), shift 0 and no grayscale maps to itself.

    Args:
        brightness, contrast, saturation: (n,) factors (1 = unchanged).
        hue: (n,) shifts in turns.
        grayscale: (n,) bool, convert to grey after the jitter.
        channel_mean: (n, 3) mean of each channel of each input image (contrast needs it).

    Returns:
        ``A`` (n, 3, 3) and ``b`` (n, 3), float32, for pixels in the scale of ``channel_mean``.
    """
    n = brightness.shape[0]
    f64 = dict(dtype=torch.float64, device="cpu")
    b, c, s, h = (t.detach().to(**f64) for t in (brightness, contrast, saturation, hue))
    angle = -2.0 * math.pi * h
    cos, sin = torch.cos(angle), torch.sin(angle)
    chroma = torch.zeros(n, 3, 3, **f64)
    chroma[:, 0, 0] = 1.0
    chroma[:, 1, 1], chroma[:, 1, 2] = s * cos, -s * sin
    chroma[:, 2, 1], chroma[:, 2, 2] = s * sin, s * cos
    to_yiq = _RGB_TO_YIQ.to(**f64)
    matrix = torch.linalg.inv(to_yiq) @ chroma @ to_yiq  # saturation and hue
    matrix = matrix * (b * c).view(n, 1, 1)
    luma = to_yiq[0]
    mean_grey = channel_mean.detach().to(**f64) @ luma  # (n,)
    bias = (b * (1.0 - c) * mean_grey).view(n, 1).expand(n, 3).clone()
    grey = grayscale.detach().cpu().bool()
    if bool(grey.any()):
        project = torch.ones(3, 1, **f64) * luma.view(1, 3)  # every channel := luma
        matrix[grey] = project @ matrix[grey]
        bias[grey] = bias[grey] @ project.T
    device = channel_mean.device
    return matrix.to(device=device, dtype=torch.float32), bias.to(device=device, dtype=torch.float32)


def apply_colour_affine(img: Tensor, matrix: Tensor, bias: Tensor, high: float) -> Tensor:
    """``clamp(A_i x + b_i, 0, high)`` for every pixel x of each (3, H, W) image i of ``img`` (n, 3, H, W), new tensor.

    Nine per-image multiply-adds over contiguous planes (a batched 3x3 matmul is ~4x slower on CPU).
    """
    n = img.shape[0]
    planes = img.reshape(n, 3, -1)
    out = torch.empty_like(planes)
    weights = matrix.to(img.dtype).unsqueeze(-1)  # (n, 3, 3, 1)
    offsets = bias.to(img.dtype).unsqueeze(-1)  # (n, 3, 1)
    for channel in range(3):
        target = out[:, channel]
        torch.addcmul(offsets[:, channel], planes[:, 0], weights[:, channel, 0], out=target)
        target.addcmul_(planes[:, 1], weights[:, channel, 1])
        target.addcmul_(planes[:, 2], weights[:, channel, 2])
    return out.clamp_(0.0, high).view_as(img)
