"""Clip-level multi-crop augmentation for DoRA (spec section C), batched over all frames of a clip.

The official code augments each frame separately in PIL (0.2-0.3 s per clip). Here one clip of decoded uint8 frames
is turned into DoRA's views with a few hundred tensor ops:

* every crop box (pre-crop -> global / local) is sampled analytically (torchvision's RandomResizedCrop algorithm,
  drawn from a ``torch.Generator``; see :mod:`.crop_boxes`) and composed into frame coordinates, so each view is
  resampled from the frame once: with uint8 antialiased ``F.interpolate`` (default) or ``torchvision.ops.roi_align``
  (one call per view size);
* colour jitter, grayscale, Gaussian blur and solarisation (:mod:`.colour_ops`) run on groups of images with
  per-image random parameters, only on the images an op is applied to, in L2-sized chunks; no PIL, no per-frame
  Python loops in the colour ops.

All randomness comes from the ``torch.Generator`` passed in, so a seeded generator reproduces a clip exactly. The
draws (:meth:`ClipMultiCrop.draw`, a :class:`~.augment.plan.ViewPlan`) and the rendering (:meth:`ClipMultiCrop.render`)
are separate, so that a batch's views can also be rendered on the training device (:mod:`.augment.device`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from dora_lightning.data.augment.colour_ops import PACKED_PIXELS
from dora_lightning.data.augment.colour_views import (
    COLOUR_BACKENDS,
    NUM_DRAWS,
    OUTPUT_DTYPES,
    ColourSettings,
    colour_views,
    normalize_views,
)
from dora_lightning.data.augment.crop_boxes import ClipBoxes, sample_clip_boxes
from dora_lightning.data.augment.crops import crop_interpolate, crop_roi_align
from dora_lightning.data.augment.multicrop_args import (
    RECIPES,
    Recipe,
    check_frames,
    check_int,
    check_per_view,
    check_prob,
    check_range,
    check_triple,
    per_image,
    recipe_value,
)
from dora_lightning.data.augment.plan import ViewPlan, colour_groups
from dora_lightning.imagenet import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["COLOUR_BACKENDS", "CROP_BACKENDS", "OUTPUT_DTYPES", "RECIPES", "ClipMultiCrop"]

CROP_BACKENDS = ("roi_align", "interpolate")


class ClipMultiCrop:
    """DoRA's (``recipe="dora"``, default) or DINO's (``recipe="dino"``) multi-crop augmentation of one clip (spec
    C), for all T frames at once.

    1. One RandomResizedCrop(``pre_crop_size``, ``pre_crop_scale``) region per clip, shared by all frames
       (``pre_crop_size=None``: the whole frame).
    2. ``num_global_crops`` global views: a RandomResizedCrop(``global_size``, ``global_scale``) box in the pre-crop
       and a horizontal flip (``global_flip_prob``), both shared by all frames.
    3. ``num_local_crops`` local views: a RandomResizedCrop(``local_size``, ``local_scale``) box in the pre-crop and
       a horizontal flip (``local_flip_prob``), both per view AND per frame.
    4. Per image (view x frame): colour jitter (``jitter_prob``; brightness/contrast/saturation factor in
       [1-x, 1+x], hue shift in [-hue, hue]), grayscale (``grayscale_prob``), Gaussian blur
       (``global_blur_prob`` / ``local_blur_prob``, sigma in ``blur_sigma`` output pixels), then solarisation of
       global views (``global_solarize_prob``; pixels >= 128 of 255 inverted). ``global_blur_prob`` and
       ``global_solarize_prob`` take one probability for every global view or a list with one per global view
       (length ``num_global_crops``). ``colour_backend``
       ``"compiled"`` (default) applies jitter + grayscale as one affine colour map per image (YIQ hue rotation, one
       clamp) with a ``torch.compile``d uint8 kernel and blurs the 8-bit result with two more (eager fallback, one
       warning, where compiling fails); ``"fused"`` is the same map in eager float ops (~2x slower per clip);
       ``"exact"`` runs torchvision's ColorJitter ops in one random order per clip with HSV hue and a clamp after
       each op (~3x slower again); see :mod:`.colour_views` and docs/data.md.
    5. Hand-off: ``output_dtype="uint8"`` (default) returns quantised uint8 views, normalised with ``mean``/``std``
       on the training device by :meth:`normalize` (VideoClipDataModule does this in ``on_after_batch_transfer``),
       which moves 4x fewer bytes from the loader workers; ``"float32"`` returns normalised float views.

    ``recipe`` (``"dora"`` or ``"dino"``) sets the arguments in which DINO's augmentation (Caron et al. 2021)
    differs from DoRA's and that are left None: ``global_blur_prob`` (DoRA 0.1; DINO [1.0, 0.1]),
    ``global_solarize_prob`` (0; [0, 0.2]) and ``local_flip_prob`` (0; 0.5); see ``RECIPES`` in
    :mod:`.multicrop_args` and docs/method.md. An argument given explicitly wins over its recipe's value. DINO's
    lists have two values, so ``recipe="dino"`` needs ``num_global_crops=2``; in YAML: ``init_args:
    {num_global_crops: 2, recipe: dino}``.

    Crop boxes are composed into frame coordinates, so each view is resampled from the frame once (the official
    code resamples twice: frame -> pre-crop -> view). ``crop_backend="interpolate"`` (the default) rounds the boxes
    to whole frame pixels and uses uint8 antialiased bilinear ``F.interpolate`` (PIL-like filtering); ``"roi_align"`` cuts the exact (fractional) boxes with bilinear
    ``roi_align`` (adaptive sampling, i.e. box-averaged when shrinking) on float frames (about 1.7x slower).
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
        global_blur_prob: float | list[float] | None = None,
        local_blur_prob: float = 0.5,
        global_solarize_prob: float | list[float] | None = None,
        local_flip_prob: float | None = None,
        recipe: Recipe = "dora",
        blur_sigma: tuple[float, float] = (0.1, 2.0),
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        crop_backend: Literal["roi_align", "interpolate"] = "interpolate",
        colour_backend: Literal["compiled", "fused", "exact"] = "compiled",
        output_dtype: Literal["uint8", "float32"] = "uint8",
    ) -> None:
        self.global_size = check_int("global_size", global_size)
        self.local_size = check_int("local_size", local_size)
        self.num_global_crops = check_int("num_global_crops", num_global_crops)
        self.num_local_crops = check_int("num_local_crops", num_local_crops, minimum=0)
        self.pre_crop_size = None if pre_crop_size is None else check_int("pre_crop_size", pre_crop_size)
        self.pre_crop_scale = check_range("pre_crop_scale", pre_crop_scale)
        self.global_scale = check_range("global_scale", global_scale)
        self.local_scale = check_range("local_scale", local_scale)
        self.global_flip_prob = check_prob("global_flip_prob", global_flip_prob)
        self.jitter_prob = check_prob("jitter_prob", jitter_prob)
        for name, value in (("brightness", brightness), ("contrast", contrast), ("saturation", saturation)):
            if not value >= 0.0:
                raise ValueError(f"{name} must be >= 0, got {value!r}")
        if not 0.0 <= hue <= 0.5:
            raise ValueError(f"hue must be in [0, 0.5], got {hue!r}")
        self.brightness = float(brightness)
        self.contrast = float(contrast)
        self.saturation = float(saturation)
        self.hue = float(hue)
        self.grayscale_prob = check_prob("grayscale_prob", grayscale_prob)
        self.recipe = recipe
        G = self.num_global_crops
        self.global_blur_prob = check_per_view(
            "global_blur_prob", recipe_value(recipe, "global_blur_prob", global_blur_prob), G
        )
        self.local_blur_prob = check_prob("local_blur_prob", local_blur_prob)
        self.global_solarize_prob = check_per_view(
            "global_solarize_prob", recipe_value(recipe, "global_solarize_prob", global_solarize_prob), G
        )
        self.local_flip_prob = check_prob(
            "local_flip_prob", recipe_value(recipe, "local_flip_prob", local_flip_prob)
        )
        self.blur_sigma = check_range("blur_sigma", blur_sigma, upper=None)
        self.mean = check_triple("mean", mean)
        self.std = check_triple("std", std, positive=True)
        if crop_backend not in CROP_BACKENDS:
            raise ValueError(f"crop_backend must be one of {CROP_BACKENDS}, got {crop_backend!r}")
        self.crop_backend = crop_backend
        if colour_backend not in COLOUR_BACKENDS:
            raise ValueError(f"colour_backend must be one of {COLOUR_BACKENDS}, got {colour_backend!r}")
        if output_dtype not in OUTPUT_DTYPES:
            raise ValueError(f"output_dtype must be one of {OUTPUT_DTYPES}, got {output_dtype!r}")
        self.colour_backend = colour_backend
        self.output_dtype = output_dtype

    @property
    def colour(self) -> ColourSettings:
        """The colour settings :func:`~dora_lightning.data.augment.colour_views.colour_views` takes, from this transform's
        arguments."""
        return ColourSettings(
            jitter_prob=self.jitter_prob,
            brightness=self.brightness,
            contrast=self.contrast,
            saturation=self.saturation,
            hue=self.hue,
            grayscale_prob=self.grayscale_prob,
            blur_sigma=self.blur_sigma,
            mean=self.mean,
            std=self.std,
            backend=self.colour_backend,
            output_dtype=self.output_dtype,
        )

    def __repr__(self) -> str:
        keys = (
            "global_size local_size num_global_crops num_local_crops pre_crop_size pre_crop_scale global_scale "
            "local_scale global_flip_prob jitter_prob brightness contrast saturation hue grayscale_prob "
            "global_blur_prob local_blur_prob global_solarize_prob local_flip_prob recipe blur_sigma mean std "
            "crop_backend colour_backend output_dtype"
        ).split()
        return f"{type(self).__name__}({', '.join(f'{k}={getattr(self, k)!r}' for k in keys)})"

    def sample_boxes(self, T: int, height: int, width: int, generator: torch.Generator) -> ClipBoxes:
        """Draw the crop geometry of a clip of ``T`` frames of ``height x width``.

        This is the first thing :meth:`__call__` draws from the generator, so for equal generator states the boxes
        returned here are exactly the ones the call uses. The number of draws does not depend on the
        probabilities, so e.g. changing ``global_flip_prob`` leaves every other draw unchanged.
        """
        return sample_clip_boxes(
            T,
            height,
            width,
            generator,
            num_global=self.num_global_crops,
            num_local=self.num_local_crops,
            pre_crop_size=self.pre_crop_size,
            pre_crop_scale=self.pre_crop_scale,
            global_scale=self.global_scale,
            local_scale=self.local_scale,
            global_flip_prob=self.global_flip_prob,
        )

    accepts_frame_list = True  # VideoClipStream passes the decoded frames unstacked (see __call__)

    def __call__(
        self, frames: Tensor | Sequence[Tensor], generator: torch.Generator
    ) -> dict[str, list[Tensor]]:
        """Augment one clip: :meth:`render` of :meth:`draw`.

        Args:
            frames: uint8 (T, H, W, 3) decoded frames, any H and W; or (T, H, W, 4) RGBA frames (the fourth byte is
                ignored), which the default backends read without a layout copy (see :attr:`frame_format`); or a
                sequence of T such (H, W, C) frames (the default crop backend then copies only the crop regions).
            generator: source of all randomness (same state -> identical output).

        Returns:
            ``{"global_views": [G x (T, 3, global_size, global_size)], "local_views": [L x (T, 3, local_size,
            local_size)]}``: uint8 in 0..255 (``output_dtype="uint8"``; :meth:`normalize` them) or float32
            normalised with ``mean``/``std``.
        """
        frames = check_frames(frames)
        return self.render(frames, self.draw(len(frames), frames[0].shape[0], frames[0].shape[1], generator))

    def draw(self, T: int, height: int, width: int, generator: torch.Generator) -> ViewPlan:
        """Every random draw of a clip of ``T`` frames of ``height x width``, in :meth:`__call__`'s order: boxes
        (:meth:`sample_boxes`), jitter-op order, colour uniforms, solarisation and local flip uniforms."""
        G, L = self.num_global_crops, self.num_local_crops
        boxes = self.sample_boxes(T, height, width, generator)
        order = torch.randperm(4, generator=generator)
        u_global = torch.rand(G * T, NUM_DRAWS, generator=generator)
        u_local = torch.rand(L * T, NUM_DRAWS, generator=generator)
        # Drawn after all of DoRA's draws (so its views are unchanged) and whatever the probabilities: a uniform per
        # global image for its solarisation and per local image for its flip, (view, frame) order.
        u_extra = torch.rand(G * T + L * T, generator=generator)
        order_local = torch.sort(
            colour_groups(u_local, self.jitter_prob, self.local_blur_prob), stable=True
        ).indices
        return ViewPlan(
            frame_size=torch.tensor([height, width], dtype=torch.int64),
            pre_crop=boxes.pre_crop,
            global_boxes=boxes.to_frame(boxes.global_boxes),
            global_flip=boxes.global_flip,
            local_boxes=boxes.to_frame(boxes.local_boxes).view(L * T, 4),
            local_flip=u_extra[G * T :] < self.local_flip_prob,
            colour_order=order,
            u_global=u_global,
            u_local=u_local,
            solarized=u_extra[: G * T] < per_image(self.global_solarize_prob, T),
            local_order=order_local,
            local_restore=torch.argsort(order_local),
        )

    def render(self, frames: Tensor | Sequence[Tensor], plan: ViewPlan) -> dict[str, list[Tensor]]:
        """The views of one clip (``frames`` as in :meth:`__call__`) from its :meth:`draw`; no randomness."""
        frames = check_frames(frames)
        T = len(frames)
        G, L = self.num_global_crops, self.num_local_crops
        gs, ls = self.global_size, self.local_size
        gboxes, order_local = plan.global_boxes, plan.local_order
        lboxes = plan.local_boxes[order_local]
        lframes = torch.arange(T).repeat(L)[order_local]
        lflip = plan.local_flip[order_local]

        packed = False
        if self.crop_backend == "roi_align":
            stacked = frames if isinstance(frames, Tensor) else torch.stack(frames)
            global_out, local_out = crop_roi_align(
                stacked[..., :3], plan.pre_crop, gboxes, lboxes, lframes, self.global_size, self.local_size
            )
        else:
            # the compiled colour backend takes the uint8 crops as they are, RGBA crops in their packed layout
            dtype = torch.uint8 if self.colour_backend == "compiled" else torch.float32
            packed = frames[0].shape[-1] == 4 and self.frame_format == "rgba"
            global_out, local_out = crop_interpolate(
                frames,
                gboxes,
                plan.global_flip,
                lboxes,
                lframes,
                lflip,
                dtype,
                packed,
                self.global_size,
                self.local_size,
            )

        if self.crop_backend == "roi_align":  # (the interpolate backend flips its uint8 crops)
            for v in range(G):  # the flip is shared by all frames of a view
                if bool(plan.global_flip[v]):
                    global_out[v * T : (v + 1) * T] = global_out[v * T : (v + 1) * T].flip(-1)
            flipped = lflip.nonzero().squeeze(1)
            if flipped.numel():
                local_out[flipped] = local_out[flipped].flip(-1)
        colour, order = self.colour, plan.colour_order.tolist()
        blur_prob = per_image(self.global_blur_prob, T)
        global_out = colour_views(
            global_out, 255.0, plan.u_global, order, blur_prob, colour, packed, plan.solarized
        )
        local_out = colour_views(
            local_out, 255.0, plan.u_local[order_local], order, self.local_blur_prob, colour, packed
        )
        local_out = local_out.index_select(0, plan.local_restore.to(local_out.device))
        return {
            "global_views": list(global_out.view(G, T, 3, gs, gs).unbind(0)),
            "local_views": list(local_out.view(L, T, 3, ls, ls).unbind(0)),
        }

    @property
    def frame_format(self) -> Literal["rgb24", "rgba"]:
        """The pixel format this transform is fastest on, which VideoClipDataModule decodes to: ``"rgba"`` for the
        default backends (the compiled colour kernel reads the crops' 4-byte pixels in place, so no crop is ever
        transposed to planar layout; about as cheap to decode as RGB), ``"rgb24"`` otherwise."""
        fast = self.crop_backend == "interpolate" and self.colour_backend == "compiled"
        return "rgba" if fast and PACKED_PIXELS else "rgb24"

    def warm_up(self, clip_length: int, height: int, width: int, clips: int = 4) -> None:
        """Augment a few clips of ``clip_length`` black ``height x width`` frames and discard them, so that the
        compiled colour backend's kernels exist in this process: data-loader workers forked afterwards inherit them
        instead of each compiling (or loading from inductor's cache) at every epoch's start. A no-op for the other
        backends."""
        if self.colour_backend != "compiled":
            return
        channels = 4 if self.frame_format == "rgba" else 3
        frames = torch.zeros(clip_length, height, width, channels, dtype=torch.uint8)
        generator = torch.Generator().manual_seed(0)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as in a data-loader worker: compiled code is guarded on the thread count
        try:
            for _ in range(clips):
                self(frames, generator)
        finally:
            torch.set_num_threads(threads)

    def normalize(self, views: Tensor) -> Tensor:
        """Views as the network takes them: float32 ``(views / 255 - mean) / std`` for uint8 views (on their
        device); float views are returned unchanged (this transform's float32 output is normalised already)."""
        if views.dtype != torch.uint8:
            return views
        return normalize_views(views, self.mean, self.std)
