"""The colour half of the clip augmentation (spec C): jitter, grayscale, blur, solarisation and the hand-off format of
the views.

Three jitter backends work on groups of views (N, 3, S, S) with per-view random draws:

* ``"compiled"`` (default): brightness, contrast, saturation, hue and grayscale folded into one affine colour map
  per view (:func:`~dora_lightning.data.augment.colour_ops.colour_matrix`; the hue shift is the YIQ rotation approximation of
  an HSV hue shift), applied to the uint8 crops by one ``torch.compile``'d kernel that clamps and rounds to uint8;
  the blur (two more compiled kernels) then runs on the 8-bit jittered views and rounds again, as PIL's op-by-op
  uint8 pipeline does (:mod:`.compiled`). About 3x cheaper than ``"fused"``; eager (same results up to
  float rounding) where compiling is unavailable.
* ``"fused"``: the same affine map on float views in eager ops, blurred in float, rounded once.
* ``"exact"``: torchvision's ColorJitter arithmetic, op by op in one random order per clip, clamping after each op,
  with the HSV hue shift (~35 passes over each view).

Every backend solarises the views it is asked to last (after the blur, as DINO's pipeline does): on the 8-bit views
for ``"compiled"``, on the float views (threshold at the 8-bit level 127.5) for the others.

Views then leave as uint8 (``output_dtype="uint8"``, quantised; 4x less to copy between processes, normalised on
the device by :func:`normalize_views`) or as float32 already normalised.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from dora_lightning.data.augment.blur import gaussian_blur
from dora_lightning.data.augment.colour_ops import (
    PACKED_PIXELS,
    adjust_brightness_,
    adjust_contrast_,
    adjust_hue_,
    adjust_saturation_,
    apply_colour_affine,
    colour_affine,
    colour_matrix,
    rgb_to_grayscale,
    solarize,
)
from dora_lightning.data.augment.compiled import (
    compiled_blur_uint8,
    compiled_colour_map_rgbx_uint8,
    compiled_colour_map_uint8,
)

__all__ = [
    "COLOUR_BACKENDS",
    "OUTPUT_DTYPES",
    "ColourSettings",
    "NUM_DRAWS",
    "colour_views",
    "normalize_views",
]

COLOUR_BACKENDS = ("compiled", "fused", "exact")
OUTPUT_DTYPES = ("uint8", "float32")
# Columns of the per-view uniform draws.
JITTER_DRAW, _U_BRIGHT, _U_CONTRAST, _U_SAT, _U_HUE, _U_GRAY, BLUR_DRAW, _U_SIGMA = range(8)
NUM_DRAWS = 8
# The exact ops run on chunks of about this many pixels, so that an op chain's working set (~12 planes) stays in
# L2; on a 2 MB-L2 core this is ~1.5x faster than whole-batch ops.
_CHUNK_PIXELS = 1 << 16


@dataclass(frozen=True)
class ColourSettings:
    """The colour augmentation of :class:`~dora_lightning.data.augment.multicrop.ClipMultiCrop` (see its arguments)."""

    jitter_prob: float
    brightness: float
    contrast: float
    saturation: float
    hue: float
    grayscale_prob: float
    blur_sigma: tuple[float, float]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    backend: Literal["compiled", "fused", "exact"]
    output_dtype: Literal["uint8", "float32"]


def _factor(u: Tensor, strength: float) -> Tensor:
    """Map uniforms in [0, 1) to factors uniform in [max(0, 1 - strength), 1 + strength]."""
    lo = max(0.0, 1.0 - strength)
    return lo + (1.0 + strength - lo) * u


def _parameters(u: Tensor, s: ColourSettings) -> Tensor:
    """(N, 5) per-view brightness, contrast, saturation factors, hue shift and blur sigma."""
    lo, hi = s.blur_sigma
    return torch.stack(
        [
            _factor(u[:, _U_BRIGHT], s.brightness),
            _factor(u[:, _U_CONTRAST], s.contrast),
            _factor(u[:, _U_SAT], s.saturation),
            (u[:, _U_HUE] * 2.0 - 1.0) * s.hue,
            lo + (hi - lo) * u[:, _U_SIGMA],
        ],
        dim=1,
    )


def _apply(img: Tensor, params: Tensor, mask: Tensor, fn: Callable, chunk: int) -> None:
    """Replace the views of ``img`` selected by ``mask`` with ``fn(views, their params, out)``, ``chunk`` at a time.

    ``fn`` may work in place and may write its result to ``out`` (a contiguous tensor to fill, or None). Unselected
    views are not touched; a contiguous selection is processed in place (no gather/scatter copies).
    """
    idx = mask.nonzero().squeeze(1)
    count = idx.numel()
    if count == 0:
        return
    first = int(idx[0])
    if int(idx[-1]) - first + 1 == count:
        for start in range(first, first + count, chunk):
            stop = min(start + chunk, first + count)
            part = img[start:stop]
            out = fn(part, params[start:stop], part)
            if out is not part:
                part.copy_(out)
    else:
        for part in idx.to(img.device).split(chunk):
            img.index_copy_(0, part, fn(img.index_select(0, part), params.index_select(0, part), None))


def _jitter_exact_(img: Tensor, params: Tensor, u: Tensor, order: Sequence[int], s: ColourSettings) -> Tensor:
    """torchvision-style jitter (in ``order``) then grayscale, in place, on views in [0, 1]."""
    chunk = max(1, _CHUNK_PIXELS // (img.shape[-2] * img.shape[-1]))
    ops = []
    for op in order:
        if op == 0 and s.brightness > 0:
            ops.append(lambda x, p: adjust_brightness_(x, p[:, 0]))
        elif op == 1 and s.contrast > 0:
            ops.append(lambda x, p: adjust_contrast_(x, p[:, 1]))
        elif op == 2 and s.saturation > 0:
            ops.append(lambda x, p: adjust_saturation_(x, p[:, 2]))
        elif op == 3 and s.hue > 0:
            ops.append(lambda x, p: adjust_hue_(x, p[:, 3]))

    def jitter(x: Tensor, p: Tensor, out: Tensor | None) -> Tensor:
        for fn in ops:
            x = fn(x, p)
        return x

    if ops:
        _apply(img, params, u[:, JITTER_DRAW] < s.jitter_prob, jitter, chunk)
    grey = lambda x, p, out: rgb_to_grayscale(x).expand_as(x)  # noqa: E731
    _apply(img, params, u[:, _U_GRAY] < s.grayscale_prob, grey, chunk)
    return img


def _jitter_factors(params: Tensor, u: Tensor, s: ColourSettings) -> tuple[Tensor, Tensor, Tensor]:
    """(N, 4) jitter factors (identity for views not jittered), and the (N,) jitter and grayscale decisions."""
    jittered = u[:, JITTER_DRAW] < s.jitter_prob
    factors = params[:, :4].clone()
    factors[~jittered.to(params.device)] = factors.new_tensor([1.0, 1.0, 1.0, 0.0])
    return factors, jittered, u[:, _U_GRAY] < s.grayscale_prob


def _jitter_fused(img: Tensor, params: Tensor, u: Tensor, high: float, s: ColourSettings) -> Tensor:
    """Jitter then grayscale as one affine map per view, clamped to [0, high]; returns a new tensor."""
    factors, jittered, grey = _jitter_factors(params, u, s)
    if not bool((jittered | grey).any()):
        return img
    matrix, bias = colour_affine(*factors.unbind(1), grey, img.mean(dim=(-2, -1)))
    return apply_colour_affine(img, matrix, bias, high)


def _colour_views_compiled(
    img: Tensor,
    u: Tensor,
    blur_prob: float | Tensor,
    s: ColourSettings,
    packed: bool,
    solarized: Tensor | None,
) -> Tensor:
    """The ``"compiled"`` backend on uint8 views, planar (N, 3, S, S) or ``packed`` (N, S, S, 4): colour map to
    planar uint8, then blur and round again, then solarise."""
    params = _parameters(u, s).to(device=img.device, dtype=torch.float32)
    factors, _, grey = _jitter_factors(params, u, s)
    matrix, mean_coef = colour_matrix(*factors.cpu().unbind(1), grey)
    matrix, mean_coef = matrix.to(img.device), mean_coef.to(img.device)
    if packed:  # one int32 word per pixel: bytes R, G, B, X in memory order
        img = compiled_colour_map_rgbx_uint8(
            img.contiguous().view(torch.int32).squeeze(-1), matrix, mean_coef
        )
    else:
        img = compiled_colour_map_uint8(img.contiguous(), matrix, mean_coef)
    blur = lambda x, p, out: compiled_blur_uint8(x, p[:, 4], s.blur_sigma[1])  # noqa: E731
    _apply(img, params, u[:, BLUR_DRAW] < blur_prob, blur, img.shape[0])
    _solarize(img, params, solarized, 255.0)
    if s.output_dtype == "uint8":
        return img
    return normalize_views(img, s.mean, s.std)


def _solarize(img: Tensor, params: Tensor, solarized: Tensor | None, high: float) -> None:
    """Solarise the views ``solarized`` (N,) bool selects, in place (None: none)."""
    if solarized is not None:
        _apply(img, params, solarized, lambda x, p, out: solarize(x, high), img.shape[0])


def colour_views(
    img: Tensor,
    high: float,
    u: Tensor,
    order: Sequence[int],
    blur_prob: float | Tensor,
    s: ColourSettings,
    packed: bool = False,
    solarized: Tensor | None = None,
) -> Tensor:
    """Colour-augment views (N, 3, S, S) with values in [0, ``high``] and return them in the output format.

    The ``"compiled"`` backend takes uint8 views (``high`` 255; float views are rounded to uint8 first), the others
    float views (modified in place). ``packed``: ``img`` is instead uint8 (N, S, S, 4), RGB plus an ignored fourth
    byte per pixel (the layout of RGBA-decoded frames' crops), which the compiled backend reads as it is (the only
    backend that takes them; ``ClipMultiCrop.frame_format`` asks for RGBA frames only then); the result is planar.

    ``u`` (N, NUM_DRAWS) holds each view's uniforms (jitter / grayscale / blur decisions and parameters),
    ``order`` the clip's jitter-op order (used by the exact backend only). ``blur_prob``: one probability for all
    views, or an (N,) float32 tensor of per-view probabilities (compared with the float32 uniforms, as a float is).
    ``solarized``: optional (N,) bool, the views to solarise after the blur (drawn by the caller). Returns uint8
    views in 0..255 (``s.output_dtype == "uint8"``) or float32 views normalised with ``s.mean`` / ``s.std``.
    """
    if packed and not (s.backend == "compiled" and img.dtype == torch.uint8 and PACKED_PIXELS):
        raise ValueError(
            "packed (N, S, S, 4) views need the compiled colour backend, uint8 views and a little-endian machine "
            f"(got backend {s.backend!r}, {img.dtype}); pass planar (N, 3, S, S) views otherwise"
        )
    n = img.shape[0]
    if n == 0:
        dtype = torch.uint8 if s.output_dtype == "uint8" else torch.float32
        return (img[..., :3].permute(0, 3, 1, 2) if packed else img).to(dtype)
    if s.backend == "compiled":
        if img.dtype != torch.uint8:  # values stay in [0, high]: rounding half up needs no clamp
            img = img.mul_(255.0 / high).add_(0.5).to(torch.uint8)
        return _colour_views_compiled(img, u, blur_prob, s, packed, solarized)
    params = _parameters(u, s).to(device=img.device, dtype=img.dtype)
    if s.backend == "exact":
        if high != 1.0:
            img = img.mul_(1.0 / high)
            high = 1.0
        img = _jitter_exact_(img, params, u, order, s)
    else:
        img = _jitter_fused(img, params, u, high, s)
    blur = lambda x, p, out: gaussian_blur(x, p[:, 4], out)  # noqa: E731
    _apply(img, params, u[:, BLUR_DRAW] < blur_prob, blur, n)  # one grouped convolution for all
    _solarize(img, params, solarized, high)
    if s.output_dtype == "uint8":
        scaled = img.mul_(255.0 / high) if high != 255.0 else img
        # every op keeps values in [0, high] (clamps, convex blur weights): rounding half up needs no clamp
        return scaled.add_(0.5).to(torch.uint8)
    return normalize_views(img.mul_(1.0 / high) if high != 1.0 else img, s.mean, s.std, scale=1.0)


def normalize_views(
    views: Tensor, mean: Sequence[float], std: Sequence[float], scale: float | None = None
) -> Tensor:
    """``(views / scale - mean) / std`` per channel of (..., 3, H, W) views, as float32 on the views' device.

    ``scale`` defaults to 255 for uint8 views and 1 otherwise. Float32 input is normalised in place. The constants
    are computed on the CPU and copied to the views' device without waiting for it (a blocking copy would wait for
    all the work queued on a GPU: two waits per view tensor of every batch).
    """
    if scale is None:
        scale = 255.0 if views.dtype == torch.uint8 else 1.0
    out = views if views.dtype == torch.float32 else views.to(torch.float32)
    mean_t = torch.tensor(mean, dtype=torch.float64).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float64).view(3, 1, 1)
    weight = (1.0 / (scale * std_t)).to(torch.float32).to(out.device, non_blocking=True)
    bias = (-mean_t / std_t).to(torch.float32).to(out.device, non_blocking=True)
    return torch.addcmul(bias, out, weight, out=out)  # one pass after the conversion
