"""Colour ops for the clip augmentation (spec section C): grayscale, HSV, colour jitter and solarisation (the blur:
:mod:`.blur`).

They work on groups of float images (n, 3, H, W) in [0, 1] with per-image parameters (n,), so one call handles many
views/frames at once; no PIL, no per-image Python loops. The ``*_`` functions work in place (and return ``img``):
on CPU, avoiding allocations and boolean masks roughly halves their cost, so everything here is plain float
arithmetic.
"""

from __future__ import annotations

import math
import sys

import torch
from torch import Tensor

__all__ = [
    "PACKED_PIXELS",
    "adjust_brightness_",
    "adjust_contrast_",
    "adjust_hue_",
    "adjust_saturation_",
    "apply_colour_affine",
    "colour_affine",
    "colour_map_uint8",
    "colour_map_rgbx_uint8",
    "colour_matrix",
    "hsv_to_rgb",
    "rgb_to_grayscale",
    "rgb_to_hsv",
    "solarize",
]

# Whether a uint8 RGBA pixel viewed as an int32 word holds R in its low byte, as colour_map_rgbx_uint8 reads it.
PACKED_PIXELS = sys.byteorder == "little"
# Solarisation inverts the pixels at or above this 8-bit level (PIL's ImageOps.solarize default, used by DINO).
SOLARIZE_THRESHOLD = 128
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


# -- fused colour jitter: the whole jitter + grayscale chain as one affine map per image ---------------------------

# RGB -> YIQ (NTSC); its Y row is _LUMA, so saturation (a blend with luma grey) scales I and Q, and a hue shift
# rotates them.
_RGB_TO_YIQ = torch.tensor(
    [[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], dtype=torch.float64
)
_YIQ_TO_RGB = torch.linalg.inv(_RGB_TO_YIQ)


def colour_matrix(
    brightness: Tensor,
    contrast: Tensor,
    saturation: Tensor,
    hue: Tensor,
    grayscale: Tensor,
) -> tuple[Tensor, Tensor]:
    """The per-image affine colour map of jitter followed by optional grayscale, as ``(A, mean_coef)``.

    The map is ``x -> A x + mean_coef * m`` (the same offset in every channel), where ``m`` is the luma of the
    image's channel means: brightness (factor), contrast (blend with ``m``), saturation (blend with luma grey) and
    hue (rotation of the YIQ chroma plane by ``-2 pi shift``, the YIQ approximation of an HSV hue shift used by e.g.
    NVIDIA DALI; a positive shift turns red towards yellow as in HSV) are all affine and, without the intermediate
    clamps of the exact ops, commute, so their order does not matter. ``grayscale`` (bool, n) appends the luma
    projection (which keeps a grey offset: the luma weights sum to 1). Factors (1, 1, 1), shift 0 and no grayscale
    give the identity.

    Args:
        brightness, contrast, saturation: (n,) factors (1 = unchanged).
        hue: (n,) shifts in turns.
        grayscale: (n,) bool, convert to grey after the jitter.

    Returns:
        ``A`` (n, 3, 3) and ``mean_coef`` (n,), float32 on the CPU.
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
    matrix = _YIQ_TO_RGB @ chroma @ _RGB_TO_YIQ  # saturation and hue
    matrix = matrix * (b * c).view(n, 1, 1)
    grey = grayscale.detach().cpu().bool()
    if bool(grey.any()):
        project = torch.ones(3, 1, **f64) * _RGB_TO_YIQ[0].view(1, 3)  # every channel := luma
        matrix[grey] = project @ matrix[grey]
    return matrix.to(torch.float32), (b * (1.0 - c)).to(torch.float32)


def colour_affine(
    brightness: Tensor,
    contrast: Tensor,
    saturation: Tensor,
    hue: Tensor,
    grayscale: Tensor,
    channel_mean: Tensor,
) -> tuple[Tensor, Tensor]:
    """:func:`colour_matrix` with its offset resolved for images of the given (n, 3) ``channel_mean``.

    Returns ``A`` (n, 3, 3) and ``b`` (n, 3), float32 on ``channel_mean``'s device, for pixels in the scale of
    ``channel_mean``: the map is ``x -> A x + b``.
    """
    matrix, mean_coef = colour_matrix(brightness, contrast, saturation, hue, grayscale)
    mean_grey = channel_mean.detach().to(device="cpu", dtype=torch.float64) @ _RGB_TO_YIQ[0]  # (n,)
    bias = (mean_coef.to(torch.float64) * mean_grey).view(-1, 1).expand(-1, 3)
    device = channel_mean.device
    return matrix.to(device), bias.to(device=device, dtype=torch.float32)


def _map_channels(red: Tensor, green: Tensor, blue: Tensor, matrix: Tensor, mean_coef: Tensor) -> Tensor:
    """The colour map of :func:`colour_map_uint8` on float32 channel planes (n, H, W): uint8 (n, 3, H, W)."""
    mean_grey = (
        red.mean(dim=(1, 2)) * _LUMA[0] + green.mean(dim=(1, 2)) * _LUMA[1] + blue.mean(dim=(1, 2)) * _LUMA[2]
    )
    offset = (mean_coef * mean_grey + 0.5).view(-1, 1, 1, 1)  # + 0.5: the float -> uint8 cast truncates
    a = matrix.view(-1, 3, 3, 1, 1)
    mixed = a[:, :, 0] * red[:, None] + a[:, :, 1] * green[:, None] + a[:, :, 2] * blue[:, None] + offset
    return mixed.clamp(0.5, 255.5).to(torch.uint8)


def colour_map_uint8(views: Tensor, matrix: Tensor, mean_coef: Tensor) -> Tensor:
    """Apply :func:`colour_matrix`'s maps to uint8 images (n, 3, H, W) and return them as uint8 (n, 3, H, W).

    ``round(clamp(A_i x + mean_coef_i * m_i, 0, 255))`` (half up) per pixel x of image i, with ``m_i`` the luma of
    its channel means, computed in float32. Written as broadcast elementwise ops so that ``torch.compile`` turns it
    into one vectorised loop (:mod:`.compiled`); run eagerly it is the reference and the fallback.
    """
    x = views.to(torch.float32)
    return _map_channels(x[:, 0], x[:, 1], x[:, 2], matrix, mean_coef)


def colour_map_rgbx_uint8(words: Tensor, matrix: Tensor, mean_coef: Tensor) -> Tensor:
    """:func:`colour_map_uint8` for packed pixels: int32 ``words`` (n, H, W), each the 4 bytes R, G, B, X of one
    pixel as stored in memory (an (n, H, W, 4) uint8 RGBX/RGBA image viewed as int32, which needs a little-endian
    machine: :data:`PACKED_PIXELS`; the fourth byte is ignored), to planar uint8 (n, 3, H, W).

    The same map, rounding and clamping as :func:`colour_map_uint8`, so the two agree exactly on the same pixels.
    Reading whole 4-byte pixels keeps the loads contiguous: compiled, the planar transposition of the crops costs
    nothing extra (3-byte RGB pixels would need strided gathers).
    """
    red, green, blue = ((words >> shift) & 255 for shift in (0, 8, 16))
    return _map_channels(red.float(), green.float(), blue.float(), matrix, mean_coef)


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


def solarize(img: Tensor, high: float = 255.0) -> Tensor:
    """PIL's ``ImageOps.solarize(threshold=128)`` (DINO's solarisation) on images with values in [0, ``high``].

    uint8 images: every value ``x >= 128`` becomes ``255 - x``. Float images: every value that would round to an
    8-bit level ``>= 128`` (``x * 255 / high >= 127.5``) becomes ``high - x``, so a float view solarised and then
    rounded equals the rounded view solarised. Returns a new tensor of ``img``'s dtype.
    """
    if img.dtype == torch.uint8:
        return torch.where(img >= SOLARIZE_THRESHOLD, 255 - img, img)
    threshold = (SOLARIZE_THRESHOLD - 0.5) * high / 255.0
    return torch.where(img >= threshold, high - img, img)
