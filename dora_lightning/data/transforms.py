"""Clip-level multi-crop augmentation for DoRA (spec section C), batched over all frames of a clip.

The official code augments each frame separately in PIL (0.2-0.3 s per clip). Here one clip of decoded uint8 frames
is turned into DoRA's views with a few hundred tensor ops:

* every crop box (pre-crop -> global / local) is sampled analytically (torchvision's RandomResizedCrop algorithm,
  drawn from a ``torch.Generator``) and composed into frame coordinates, so each view is resampled from the frame
  once: with ``torchvision.ops.roi_align`` (default; one call per view size) or uint8 ``F.interpolate``;
* colour jitter, grayscale and Gaussian blur run on groups of images with per-image random parameters, only on the
  images an op is applied to, in L2-sized chunks; no PIL, no per-frame Python loops in the colour ops.

All randomness comes from the ``torch.Generator`` passed in, so a seeded generator reproduces a clip exactly.
Tested on CPU (the data-loader workers); tensors stay on the frames' device, but GPU use is untested.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import roi_align

__all__ = [
    "ClipBoxes",
    "ClipMultiCrop",
    "adjust_brightness_",
    "adjust_contrast_",
    "adjust_hue_",
    "adjust_saturation_",
    "gaussian_blur",
    "hsv_to_rgb",
    "rgb_to_grayscale",
    "rgb_to_hsv",
    "sample_resized_crop_boxes",
]

# Aspect-ratio range of every RandomResizedCrop in DINO/DoRA (torchvision's default).
CROP_RATIO: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
# torchvision's RandomResizedCrop tries this many random boxes before falling back to a centre crop.
CROP_ATTEMPTS = 10
# ITU-R 601 luma weights, as PIL's convert("L") used by the official code (torchvision uses 0.2989 for R).
_LUMA = (0.299, 0.587, 0.114)


# ---------------------------------------------------------------------------------------------------------------
# Geometry
# ---------------------------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------------------------
# Colour ops on float images (n, 3, H, W) in [0, 1] with per-image parameters (n,).
# The ``*_`` functions work in place (and return ``img``): on CPU, avoiding allocations and boolean masks roughly
# halves their cost, so everything below is plain float arithmetic.
# ---------------------------------------------------------------------------------------------------------------


def rgb_to_grayscale(img: Tensor) -> Tensor:
    """Luma 0.299 R + 0.587 G + 0.114 B of (..., 3, H, W) images, as (..., 1, H, W)."""
    r, g, b = img.unbind(-3)
    return torch.mul(r, _LUMA[0]).add_(g, alpha=_LUMA[1]).add_(b, alpha=_LUMA[2]).unsqueeze(-3)


def _per_image(factor: Tensor, img: Tensor) -> Tensor:
    return factor.to(device=img.device, dtype=img.dtype).view(-1, *([1] * (img.dim() - 1)))


def adjust_brightness_(img: Tensor, factor: Tensor) -> Tensor:
    """In place: multiply each image by its ``factor``, clamp to [0, 1]."""
    return img.mul_(_per_image(factor, img)).clamp_(0.0, 1.0)


def adjust_contrast_(img: Tensor, factor: Tensor) -> Tensor:
    """In place: blend each image with its mean grey level (``factor`` 0 = flat grey, 1 = unchanged), clamp."""
    f = _per_image(factor, img)
    channel_mean = img.mean(dim=(-2, -1))  # (n, 3); the grey mean is the luma of the channel means
    grey_mean = (channel_mean * channel_mean.new_tensor(_LUMA)).sum(dim=1).view_as(f)
    return img.lerp_(grey_mean.expand_as(img), 1.0 - f).clamp_(0.0, 1.0)


def adjust_saturation_(img: Tensor, factor: Tensor) -> Tensor:
    """In place: blend each image with its grayscale version (``factor`` 0 = grey, 1 = unchanged), clamp."""
    f = _per_image(factor, img)
    return img.lerp_(rgb_to_grayscale(img).expand_as(img), 1.0 - f).clamp_(0.0, 1.0)


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


def gaussian_blur(img: Tensor, sigma: Tensor) -> Tensor:
    """Blur (n, C, H, W) images with a separable Gaussian of per-image ``sigma`` (n,), reflect padding.

    Image i uses kernel size 2 * ceil(3 * sigma_i) + 1, the radius capped at ``min(H, W) - 1`` so that reflect
    padding fits. All images go through one grouped (depthwise) convolution per direction.
    """
    n, c, height, width = img.shape
    cap = min(height, width) - 1
    if n == 0 or cap < 1:
        return img.clone()
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
    return x.reshape(n, c, height, width)


# ---------------------------------------------------------------------------------------------------------------
# The clip transform
# ---------------------------------------------------------------------------------------------------------------


def _check_size(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _check_prob(name: str, value: float) -> float:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {value!r}")
    return float(value)


def _check_pair(name: str, value: Sequence[float]) -> tuple[float, float]:
    if len(value) != 2:
        raise ValueError(f"{name} must be a pair (lo, hi), got {value!r}")
    return float(value[0]), float(value[1])


def _check_scale(name: str, value: Sequence[float]) -> tuple[float, float]:
    lo, hi = _check_pair(name, value)
    if not 0.0 < lo <= hi <= 1.0:
        raise ValueError(f"{name} must satisfy 0 < lo <= hi <= 1, got {value!r}")
    return lo, hi


def _check_triple(name: str, value: Sequence[float], positive: bool = False) -> tuple[float, float, float]:
    if len(value) != 3:
        raise ValueError(f"{name} must have 3 values (one per RGB channel), got {value!r}")
    if positive and min(value) <= 0:
        raise ValueError(f"{name} values must be > 0, got {value!r}")
    return float(value[0]), float(value[1]), float(value[2])


# Columns of the per-image colour draws.
_U_JITTER, _U_BRIGHT, _U_CONTRAST, _U_SAT, _U_HUE, _U_GRAY, _U_BLUR, _U_SIGMA = range(8)
# Colour ops run on chunks of about this many pixels, so that an op chain's working set (~12 planes) stays in L2;
# on a 2 MB-L2 core this is ~1.5x faster than whole-batch ops.
_CHUNK_PIXELS = 1 << 16
CROP_BACKENDS = ("roi_align", "interpolate")


def _apply(img: Tensor, params: Tensor, mask: Tensor, fn, chunk: int) -> None:
    """Replace the images of ``img`` selected by ``mask`` with ``fn(images, their params)``, ``chunk`` at a time.

    ``fn`` may work in place. Unselected images are not touched; a contiguous selection is processed in place
    (no gather/scatter copies).
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
            out = fn(part, params[start:stop])
            if out is not part:
                part.copy_(out)
    else:
        for part in idx.to(img.device).split(chunk):
            img.index_copy_(0, part, fn(img.index_select(0, part), params.index_select(0, part)))


def _planar_float(hwc: Tensor, out: Tensor) -> Tensor:
    """Write uint8 (N, h, w, 3) images into float (N, 3, h, w) ``out``, scaled to [0, 1]."""
    return out.copy_(hwc.permute(0, 3, 1, 2)).mul_(1.0 / 255.0)


class ClipMultiCrop:
    """DoRA's multi-crop augmentation of one clip (spec C), for all T frames at once.

    1. One RandomResizedCrop(``pre_crop_size``, ``pre_crop_scale``) region per clip, shared by all frames
       (``pre_crop_size=None``: the whole frame).
    2. ``num_global_crops`` global views: a RandomResizedCrop(``global_size``, ``global_scale``) box in the pre-crop
       and a horizontal flip (``global_flip_prob``), both shared by all frames.
    3. ``num_local_crops`` local views: a RandomResizedCrop(``local_size``, ``local_scale``) box in the pre-crop per
       view AND per frame, no flip.
    4. Per image (view x frame): colour jitter (``jitter_prob``; brightness/contrast/saturation factor in
       [1-x, 1+x], hue shift in [-hue, hue], in one random order per clip), grayscale (``grayscale_prob``),
       Gaussian blur (``global_blur_prob`` / ``local_blur_prob``, sigma in ``blur_sigma`` output pixels), then
       normalisation with ``mean``/``std``.

    Crop boxes are composed into frame coordinates, so each view is resampled from the frame once (the official
    code resamples twice: frame -> pre-crop -> view). ``crop_backend="roi_align"`` cuts the exact (fractional)
    boxes with bilinear ``roi_align`` (adaptive sampling, i.e. box-averaged when shrinking) on float frames;
    ``"interpolate"`` rounds the boxes to whole frame pixels and uses uint8 antialiased bilinear
    ``F.interpolate`` (PIL-like filtering, several times faster on CPU).
    """

    def __init__(
        self,
        global_size: int = 224,
        local_size: int = 112,
        num_global_crops: int = 1,
        num_local_crops: int = 6,
        pre_crop_size: int | None = 300,
        pre_crop_scale: tuple[float, float] = (0.2, 1.0),
        global_scale: tuple[float, float] = (0.4, 1.0),
        local_scale: tuple[float, float] = (0.05, 0.4),
        global_flip_prob: float = 0.5,
        jitter_prob: float = 0.8,
        brightness: float = 0.4,
        contrast: float = 0.4,
        saturation: float = 0.2,
        hue: float = 0.1,
        grayscale_prob: float = 0.2,
        global_blur_prob: float = 0.1,
        local_blur_prob: float = 0.5,
        blur_sigma: tuple[float, float] = (0.1, 2.0),
        mean: tuple[float, float, float] = (0.485, 0.456, 0.406),
        std: tuple[float, float, float] = (0.229, 0.224, 0.225),
        crop_backend: Literal["roi_align", "interpolate"] = "roi_align",
    ) -> None:
        self.global_size = _check_size("global_size", global_size)
        self.local_size = _check_size("local_size", local_size)
        if (
            isinstance(num_global_crops, bool)
            or not isinstance(num_global_crops, int)
            or num_global_crops < 1
        ):
            raise ValueError(f"num_global_crops must be an integer >= 1, got {num_global_crops!r}")
        if isinstance(num_local_crops, bool) or not isinstance(num_local_crops, int) or num_local_crops < 0:
            raise ValueError(f"num_local_crops must be an integer >= 0, got {num_local_crops!r}")
        self.num_global_crops = num_global_crops
        self.num_local_crops = num_local_crops
        self.pre_crop_size = None if pre_crop_size is None else _check_size("pre_crop_size", pre_crop_size)
        self.pre_crop_scale = _check_scale("pre_crop_scale", pre_crop_scale)
        self.global_scale = _check_scale("global_scale", global_scale)
        self.local_scale = _check_scale("local_scale", local_scale)
        self.global_flip_prob = _check_prob("global_flip_prob", global_flip_prob)
        self.jitter_prob = _check_prob("jitter_prob", jitter_prob)
        for name, value in (("brightness", brightness), ("contrast", contrast), ("saturation", saturation)):
            if not value >= 0.0:
                raise ValueError(f"{name} must be >= 0, got {value!r}")
        if not 0.0 <= hue <= 0.5:
            raise ValueError(f"hue must be in [0, 0.5], got {hue!r}")
        self.brightness = float(brightness)
        self.contrast = float(contrast)
        self.saturation = float(saturation)
        self.hue = float(hue)
        self.grayscale_prob = _check_prob("grayscale_prob", grayscale_prob)
        self.global_blur_prob = _check_prob("global_blur_prob", global_blur_prob)
        self.local_blur_prob = _check_prob("local_blur_prob", local_blur_prob)
        self.blur_sigma = _check_pair("blur_sigma", blur_sigma)
        if not 0.0 < self.blur_sigma[0] <= self.blur_sigma[1]:
            raise ValueError(f"blur_sigma must satisfy 0 < lo <= hi, got {blur_sigma!r}")
        self.mean = _check_triple("mean", mean)
        self.std = _check_triple("std", std, positive=True)
        if crop_backend not in CROP_BACKENDS:
            raise ValueError(f"crop_backend must be one of {CROP_BACKENDS}, got {crop_backend!r}")
        self.crop_backend = crop_backend

    def __repr__(self) -> str:
        keys = (
            "global_size local_size num_global_crops num_local_crops pre_crop_size pre_crop_scale global_scale "
            "local_scale global_flip_prob jitter_prob brightness contrast saturation hue grayscale_prob "
            "global_blur_prob local_blur_prob blur_sigma mean std crop_backend"
        ).split()
        return f"{type(self).__name__}({', '.join(f'{k}={getattr(self, k)!r}' for k in keys)})"

    # -- geometry ------------------------------------------------------------------------------------------------

    def sample_boxes(self, T: int, height: int, width: int, generator: torch.Generator) -> ClipBoxes:
        """Draw the crop geometry of a clip of ``T`` frames of ``height x width``.

        This is the first thing :meth:`__call__` draws from the generator, so for equal generator states the boxes
        returned here are exactly the ones the call uses. The number of draws does not depend on the
        probabilities, so e.g. changing ``global_flip_prob`` leaves every other draw unchanged.
        """
        G, L = self.num_global_crops, self.num_local_crops
        n_boxes = 1 + G + L * T
        u = torch.rand(n_boxes * CROP_ATTEMPTS * 4 + G, generator=generator, dtype=torch.float64)
        u_boxes = u[: n_boxes * CROP_ATTEMPTS * 4].view(n_boxes, CROP_ATTEMPTS, 4)
        u_flip = u[n_boxes * CROP_ATTEMPTS * 4 :]

        if self.pre_crop_size is None:
            pre_crop = torch.tensor([0.0, 0.0, float(width), float(height)], dtype=torch.float64)
            region = (height, width)
        else:
            pre_crop = sample_resized_crop_boxes(u_boxes[:1], height, width, self.pre_crop_scale)[0]
            region = (self.pre_crop_size, self.pre_crop_size)
        global_boxes = sample_resized_crop_boxes(u_boxes[1 : 1 + G], *region, self.global_scale)
        local_boxes = sample_resized_crop_boxes(u_boxes[1 + G :], *region, self.local_scale).view(L, T, 4)
        return ClipBoxes(
            frame_size=(height, width),
            pre_crop=pre_crop,
            region_size=region,
            global_boxes=global_boxes,
            global_flip=u_flip < self.global_flip_prob,
            local_boxes=local_boxes,
        )

    # -- the transform -------------------------------------------------------------------------------------------

    def __call__(self, frames: Tensor, generator: torch.Generator) -> dict[str, list[Tensor]]:
        """Augment one clip.

        Args:
            frames: uint8 (T, H, W, 3) decoded frames, any H and W.
            generator: source of all randomness (same state -> identical output).

        Returns:
            ``{"global_views": [G x (T, 3, global_size, global_size)], "local_views": [L x (T, 3, local_size,
            local_size)]}``, float32, normalised with ``mean``/``std``.
        """
        if frames.dim() != 4 or frames.shape[-1] != 3 or frames.dtype != torch.uint8:
            raise ValueError(f"frames must be uint8 (T, H, W, 3), got {frames.dtype} {tuple(frames.shape)}")
        T, height, width, _ = frames.shape
        if T < 1 or height < 1 or width < 1:
            raise ValueError(f"frames must be non-empty, got shape {tuple(frames.shape)}")
        G, L = self.num_global_crops, self.num_local_crops
        gs, ls = self.global_size, self.local_size
        boxes = self.sample_boxes(T, height, width, generator)
        order = torch.randperm(4, generator=generator).tolist()
        u_global = torch.rand(G * T, 8, generator=generator)
        u_local = torch.rand(L * T, 8, generator=generator)

        gboxes = boxes.to_frame(boxes.global_boxes)  # (G, 4)
        # Local images are made in the order [jitter only, jitter + blur, blur only, neither] so that both
        # subsets are contiguous slices for the colour ops; `restore` puts them back in (view, frame) order.
        jittered = u_local[:, _U_JITTER] < self.jitter_prob
        blurred = u_local[:, _U_BLUR] < self.local_blur_prob
        group = torch.where(jittered, blurred.long(), 3 - blurred.long())
        order_local = torch.sort(group, stable=True).indices
        restore = torch.argsort(order_local)
        lboxes = boxes.to_frame(boxes.local_boxes).view(L * T, 4)[order_local]
        lframes = torch.arange(T).repeat(L)[order_local]

        if self.crop_backend == "roi_align":
            global_out, local_out = self._crop_roi_align(frames, boxes.pre_crop, gboxes, lboxes, lframes)
        else:
            global_out, local_out = self._crop_interpolate(frames, gboxes, lboxes, lframes)

        for v in range(G):  # the flip is shared by all frames of a view
            if bool(boxes.global_flip[v]):
                global_out[v * T : (v + 1) * T] = global_out[v * T : (v + 1) * T].flip(-1)
        global_out = self._colour(global_out, u_global, order, self.global_blur_prob)
        local_out = self._colour(local_out, u_local[order_local], order, self.local_blur_prob)
        local_out = local_out.index_select(0, restore.to(local_out.device))
        return {
            "global_views": list(global_out.view(G, T, 3, gs, gs).unbind(0)),
            "local_views": list(local_out.view(L, T, 3, ls, ls).unbind(0)),
        }

    def _crop_roi_align(
        self, frames: Tensor, pre_crop: Tensor, gboxes: Tensor, lboxes: Tensor, lframes: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Cut global views (boxes shared by all frames) and local views (box ``lboxes[i]`` of frame ``lframes[i]``)
        with roi_align. Returns float (G*T, 3, gs, gs) ordered (view, frame) and (K, 3, ls, ls), in [0, 1]."""
        T, height, width, _ = frames.shape
        G = gboxes.shape[0]
        # Convert only the part of the frames the crops can touch: the pre-crop plus a 1-pixel margin for the
        # bilinear neighbours, so roi_align sees exactly the pixels it would see on the full frame.
        px0, py0, px1, py1 = (int(v) for v in pre_crop.tolist())
        cx0, cy0 = max(px0 - 1, 0), max(py0 - 1, 0)
        cx1, cy1 = min(px1 + 1, width), min(py1 + 1, height)
        src = frames[:, cy0:cy1, cx0:cx1]
        image = _planar_float(src, torch.empty(T, 3, cy1 - cy0, cx1 - cx0, device=frames.device))
        shift = torch.tensor([cx0, cy0, cx0, cy0], dtype=torch.float64)

        # Global boxes are shared by all frames: cut each once from the (1, 3T, h, w) stack (roi_align's per-box
        # set-up is about half its cost). Output (G, 3T, s, s) is (G * T, 3, s, s) ordered (view, frame).
        rois = torch.cat([torch.zeros(G, 1, dtype=torch.float64), gboxes - shift], dim=1)
        stack = image.view(1, 3 * T, *image.shape[2:])
        gs, ls = self.global_size, self.local_size
        global_out = self._roi_align(stack, rois, gs).view(G * T, 3, gs, gs)
        local_rois = torch.cat([lframes.to(torch.float64).unsqueeze(1), lboxes - shift], dim=1)
        return global_out, self._roi_align(image, local_rois, ls)

    @staticmethod
    def _roi_align(image: Tensor, rois: Tensor, size: int) -> Tensor:
        return roi_align(
            image,
            rois.to(device=image.device, dtype=image.dtype),
            output_size=(size, size),
            spatial_scale=1.0,
            sampling_ratio=-1,  # adaptive: ceil(box size / output size) samples per bin and direction
            aligned=True,
        )

    def _crop_interpolate(
        self, frames: Tensor, gboxes: Tensor, lboxes: Tensor, lframes: Tensor
    ) -> tuple[Tensor, Tensor]:
        """As :meth:`_crop_roi_align`, with uint8 antialiased bilinear interpolation of boxes rounded to whole
        frame pixels."""
        T, height, width, _ = frames.shape
        gs, ls = self.global_size, self.local_size
        channels = frames.permute(0, 3, 1, 2)  # (T, 3, H, W) channels-last view: the fast uint8 path

        def pixels(box: list[float]) -> tuple[int, int, int, int]:
            x0, y0, x1, y1 = (math.floor(v + 0.5) for v in box)
            x0, y0 = min(max(x0, 0), width - 1), min(max(y0, 0), height - 1)
            return x0, y0, min(max(x1, x0 + 1), width), min(max(y1, y0 + 1), height)

        def resize(crop: Tensor, size: int) -> Tensor:
            """uint8 (n, 3, h, w) -> uint8 (n, size, size, 3)."""
            out = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
            return out.permute(0, 2, 3, 1)  # a plain view: the output is channels-last

        global_out = torch.empty(gboxes.shape[0] * T, 3, gs, gs, device=frames.device)
        for v, box in enumerate(gboxes.tolist()):
            x0, y0, x1, y1 = pixels(box)
            _planar_float(resize(channels[:, :, y0:y1, x0:x1], gs), global_out[v * T : (v + 1) * T])
        hwc = torch.empty(lboxes.shape[0], ls, ls, 3, dtype=torch.uint8, device=frames.device)
        for i, (box, t) in enumerate(zip(lboxes.tolist(), lframes.tolist(), strict=True)):
            x0, y0, x1, y1 = pixels(box)
            hwc[i] = resize(channels[t : t + 1, :, y0:y1, x0:x1], ls)[0]
        local_out = _planar_float(hwc, torch.empty(lboxes.shape[0], 3, ls, ls, device=frames.device))
        return global_out, local_out

    def _colour(self, img: Tensor, u: Tensor, order: list[int], blur_prob: float) -> Tensor:
        """Per-image jitter / grayscale / blur of (N, 3, S, S) images in [0, 1] (in place), then normalise.

        ``u`` (N, 8) holds each image's uniforms; every op only touches the images it is applied to.
        """
        n, _, height, width = img.shape
        if n == 0:
            return img
        chunk = max(1, _CHUNK_PIXELS // (height * width))
        # Per-image parameters, computed once: (N, 5) = brightness, contrast, saturation factors, hue shift, sigma.
        lo, hi = self.blur_sigma
        params = torch.stack(
            [
                self._factor(u[:, _U_BRIGHT], self.brightness),
                self._factor(u[:, _U_CONTRAST], self.contrast),
                self._factor(u[:, _U_SAT], self.saturation),
                (u[:, _U_HUE] * 2.0 - 1.0) * self.hue,
                lo + (hi - lo) * u[:, _U_SIGMA],
            ],
            dim=1,
        ).to(device=img.device, dtype=img.dtype)

        ops = []
        for op in order:
            if op == 0 and self.brightness > 0:
                ops.append(lambda x, p: adjust_brightness_(x, p[:, 0]))
            elif op == 1 and self.contrast > 0:
                ops.append(lambda x, p: adjust_contrast_(x, p[:, 1]))
            elif op == 2 and self.saturation > 0:
                ops.append(lambda x, p: adjust_saturation_(x, p[:, 2]))
            elif op == 3 and self.hue > 0:
                ops.append(lambda x, p: adjust_hue_(x, p[:, 3]))

        def jitter(x: Tensor, p: Tensor) -> Tensor:
            for fn in ops:
                x = fn(x, p)
            return x

        if ops:
            _apply(img, params, u[:, _U_JITTER] < self.jitter_prob, jitter, chunk)
        grey = lambda x, p: rgb_to_grayscale(x).expand_as(x)  # noqa: E731
        _apply(img, params, u[:, _U_GRAY] < self.grayscale_prob, grey, chunk)
        blur = lambda x, p: gaussian_blur(x, p[:, 4])  # noqa: E731
        _apply(img, params, u[:, _U_BLUR] < blur_prob, blur, n)  # one grouped convolution for all

        mean = img.new_tensor(self.mean).view(1, 3, 1, 1)
        std = img.new_tensor(self.std).view(1, 3, 1, 1)
        for start in range(0, n, chunk):
            img[start : start + chunk].sub_(mean).div_(std)
        return img

    @staticmethod
    def _factor(u: Tensor, strength: float) -> Tensor:
        """Map uniforms in [0, 1) to factors uniform in [max(0, 1 - strength), 1 + strength]."""
        lo = max(0.0, 1.0 - strength)
        return lo + (1.0 + strength - lo) * u
