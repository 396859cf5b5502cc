"""The random half of the clip augmentation: a clip's :class:`ViewPlan` (every random draw of
:meth:`ClipMultiCrop.__call__ <dora_lightning.data.augment.multicrop.ClipMultiCrop.__call__>`, as small tensors) and
:class:`FramesAndPlan`, the worker-side transform of ``data.augment_on=gpu`` that emits a clip's frames with its plan
instead of its views."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from dora_lightning.data.augment.colour_views import BLUR_DRAW, JITTER_DRAW

if TYPE_CHECKING:
    from dora_lightning.data.augment.multicrop import ClipMultiCrop

__all__ = ["PLAN_PREFIX", "FramesAndPlan", "ViewPlan", "colour_groups"]

PLAN_PREFIX = "plan_"
"""Prefix of the plan's fields in a sample / batch of ``data.augment_on=gpu`` (``plan_global_boxes``, ...)."""


def colour_groups(u_local: Tensor, jitter_prob: float, blur_prob: float) -> Tensor:
    """(N,) int64 group of each local image by its colour draws ``u_local`` (N, NUM_DRAWS): 0 jitter only,
    1 jitter + blur, 2 blur only, 3 neither. Sorted by group, both subsets the colour ops select are contiguous."""
    jittered = u_local[:, JITTER_DRAW] < jitter_prob
    blurred = (u_local[:, BLUR_DRAW] < blur_prob).long()
    return torch.where(jittered, blurred, 3 - blurred)


@dataclass(frozen=True)
class ViewPlan:
    """Every random draw of one clip's views (drawn by ``ClipMultiCrop.draw``), or of a batch of clips (each field
    with a leading batch dimension B, as collated).

    Boxes are (x0, y0, x1, y1) float64 in frame pixels (the frame's own size, ``frame_size``; padding to a larger
    canvas never enters them). Per-image tensors of global views are in (view, frame) order, G * T of them; of local
    views L * T in (view, frame) order. ``local_order`` / ``local_restore`` are derived from ``u_local``: the local
    images sorted so that the colour ops' subsets are contiguous [jitter only, jitter + blur, blur only, neither],
    and the inverse permutation.
    """

    frame_size: Tensor  # (2,) int64: height, width of the clip's frames
    pre_crop: Tensor  # (4,) float64: the pre-crop region in frame pixels
    global_boxes: Tensor  # (G, 4) float64, shared by all frames
    global_flip: Tensor  # (G,) bool, shared by all frames
    local_boxes: Tensor  # (L * T, 4) float64, one per local view and frame
    local_flip: Tensor  # (L * T,) bool
    colour_order: Tensor  # (4,) int64: the clip's jitter-op order (used by the exact colour backend)
    u_global: Tensor  # (G * T, NUM_DRAWS) float32: each global image's colour / blur uniforms
    u_local: Tensor  # (L * T, NUM_DRAWS) float32
    solarized: Tensor  # (G * T,) bool
    local_order: Tensor  # (L * T,) int64
    local_restore: Tensor  # (L * T,) int64

    names: ClassVar[tuple[str, ...]] = (
        "frame_size pre_crop global_boxes global_flip local_boxes local_flip colour_order u_global u_local solarized "
        "local_order local_restore"
    ).split()

    def to_fields(self) -> dict[str, Tensor]:
        """The plan as sample fields ``{PLAN_PREFIX + name: tensor}`` (collated into (B, ...) tensors). Floating
        tensors travel as their bits (an integer view), so that nothing on the way (e.g. Lightning's ``*-true``
        precisions, which cast a batch's floating tensors before the transfer) can round them."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[PLAN_PREFIX + f.name] = value.view(_BITS[value.dtype]) if value.is_floating_point() else value
        return out

    @classmethod
    def from_fields(cls, batch: Mapping[str, Any]) -> ViewPlan:
        """The plan held in ``batch``'s ``PLAN_PREFIX`` fields (a sample's, or a batch's with a leading B)."""
        missing = [name for name in cls.names if PLAN_PREFIX + name not in batch]
        if missing:
            raise KeyError(f"the batch holds no view plan (missing {[PLAN_PREFIX + n for n in missing]})")
        values = {name: batch[PLAN_PREFIX + name] for name in cls.names}
        for name, dtype in _FLOAT_FIELDS.items():
            if not values[name].is_floating_point():
                values[name] = values[name].view(dtype)
        return cls(**values)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> ViewPlan:
        """The plan with every tensor on ``device``."""
        return ViewPlan(**{n: getattr(self, n).to(device, non_blocking=non_blocking) for n in self.names})


# the floating fields of ViewPlan and the integer types their bits travel as
_FLOAT_FIELDS = {
    "pre_crop": torch.float64,
    "global_boxes": torch.float64,
    "local_boxes": torch.float64,
    "u_global": torch.float32,
    "u_local": torch.float32,
}
_BITS = {torch.float64: torch.int64, torch.float32: torch.int32}


class FramesAndPlan:
    """The worker-side transform of ``data.augment_on=gpu``: draws a clip's :class:`ViewPlan` with ``transform``
    (exactly the draws its ``__call__`` makes) and returns the clip's uint8 frames, padded with zeros at the
    bottom / right to ``canvas = (height, width)`` so that clips of videos of any size collate, plus the plan's
    fields; the views are rendered on the training device (:class:`~dora_lightning.data.augment.device.DeviceAugment`).

    Sample fields: ``frames`` uint8 (T, canvas height, canvas width, C), C = 4 (RGBA, the 4th byte unused) or 3 (RGB)
    as decoded (:attr:`frame_format`), and ``plan_*`` (see :meth:`ViewPlan.to_fields`).
    """

    accepts_frame_list = True  # VideoClipStream passes the decoded frames unstacked

    def __init__(self, transform: ClipMultiCrop, canvas: tuple[int, int]) -> None:
        self.transform = transform
        self.canvas = (int(canvas[0]), int(canvas[1]))

    @property
    def frame_format(self) -> str:
        """The transform's decode format (``"rgba"`` for the default backends), so that both paths see the same
        decoded pixels (FFmpeg's scaled RGBA and RGB24 frames differ by about one 8-bit level on average)."""
        return self.transform.frame_format

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.transform!r}, canvas={self.canvas})"

    def __call__(self, frames: Tensor | Sequence[Tensor], generator: torch.Generator) -> dict[str, Tensor]:
        """The clip's padded frames and view plan (``frames``: T uint8 (H, W, C) frames, C >= 3, or (T, H, W, C))."""
        T, height, width = len(frames), frames[0].shape[0], frames[0].shape[1]
        canvas_h, canvas_w = self.canvas
        if height > canvas_h or width > canvas_w:
            raise ValueError(
                f"a {width}x{height} clip does not fit the {canvas_w}x{canvas_h} frame canvas of augment_on=gpu"
            )
        plan = self.transform.draw(T, height, width, generator)
        # the frames as decoded: RGBA's 4th byte costs a third more bytes to hand over, dropping it here 25x more
        # worker time than the copy itself (a strided copy)
        out = torch.empty(T, canvas_h, canvas_w, frames[0].shape[-1], dtype=torch.uint8)
        out[:, height:] = 0
        out[:, :height, width:] = 0
        for t in range(T):
            out[t, :height, :width] = frames[t]
        return {"frames": out, **plan.to_fields()}
