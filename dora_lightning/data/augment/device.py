"""Rendering of a batch's views on the training device (``data.augment_on=gpu``), batched over its clips.

The loader workers decode the clips and draw their :class:`~.plan.ViewPlan` (:class:`~.plan.FramesAndPlan`); the
training process renders all views of a batch at once with torch ops that run on any device: one gather of every
clip's pre-crop region (float), one ``roi_align`` call for all global views and one for all local views (the batch
index column of the rois picks the clip / frame), flips by ``torch.where``, then the colour ops of
:func:`~dora_lightning.data.augment.colour_views.colour_views` once for all global and once for all local images (the
``"fused"`` map for the CPU-only ``"compiled"`` backend; the ``"exact"`` backend once per distinct jitter-op order),
and the normalisation. The views equal those of ``ClipMultiCrop(crop_backend="roi_align", colour_backend=...)`` up
to float rounding (within one 8-bit level; tests/test_device_augment.py).

The host-side bits of the plan (region extents, colour decisions and parameters) are taken from the batch before it
is moved (:meth:`DeviceAugment.prepare`), every copy to the device is non-blocking, and with the ``"fused"`` colour
backend (:mod:`.device_colour`) nothing is read back from the device: rendering never waits for the device's queue
(the previous training step) to drain. The ``"exact"`` backend's ops read per-image values back (a few waits per
batch).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from dora_lightning.data.augment.colour_views import (
    ColourSettings,
    colour_views,
    normalize_views,
)
from dora_lightning.data.augment.crops import roi_align_views
from dora_lightning.data.augment.device_colour import fused_colour_views
from dora_lightning.data.augment.multicrop import ClipMultiCrop
from dora_lightning.data.augment.multicrop_args import per_image
from dora_lightning.data.augment.plan import PLAN_PREFIX, ViewPlan, colour_groups

__all__ = ["HOST_PLAN", "DeviceAugment", "device_colour_backend"]

HOST_PLAN = "_host_plan"
"""Batch key of the CPU copy of the plan that :meth:`DeviceAugment.prepare` puts in a batch before its transfer."""


def device_colour_backend(transform: ClipMultiCrop) -> str:
    """The colour backend the device renderer uses for ``transform``: its own, except ``"fused"`` for the CPU-only
    ``"compiled"`` backend (the same colour map, rounded once instead of after the jitter and after the blur)."""
    return "fused" if transform.colour_backend == "compiled" else transform.colour_backend


class _HostPlan:
    """A batch's plan on the CPU, in an object that Lightning's batch transfer leaves where it is."""

    def __init__(self, plan: ViewPlan) -> None:
        self.plan = plan


class DeviceAugment:
    """Renders ``transform``'s views of a batch of clips from their frames and plans, on the frames' device.

    Args:
        transform: the augmentation whose plans the batch holds (sizes, probabilities, colour settings, mean/std).
    """

    def __init__(self, transform: ClipMultiCrop) -> None:
        self.transform = transform
        self.colour: ColourSettings = dataclasses.replace(
            transform.colour, backend=device_colour_backend(transform)
        )

    def prepare(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Before the transfer (batch on the CPU): move the plan's fields into one object the transfer does not
        touch, so that rendering reads its decisions without a device round trip."""
        if HOST_PLAN in batch or PLAN_PREFIX + "frame_size" not in batch:
            return batch
        plan = ViewPlan.from_fields(batch)
        rest = {k: v for k, v in batch.items() if not k.startswith(PLAN_PREFIX)}
        return {**rest, HOST_PLAN: _HostPlan(plan)}

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """The batch with ``global_views`` (G x (B, T, 3, gs, gs)) and ``local_views`` (L x (B, T, 3, ls, ls))
        rendered from its ``frames`` (B, T, H, W, C >= 3) uint8 and plan, normalised float32 (as the CPU path's views
        after normalisation); the frames and plan are dropped, every other field is kept."""
        if HOST_PLAN in batch:
            plan = batch[HOST_PLAN].plan
        else:  # not prepared: read the plan back from wherever it is
            plan = ViewPlan.from_fields(batch).to("cpu")
        rest = {
            k: v for k, v in batch.items() if k not in (HOST_PLAN, "frames") and not k.startswith(PLAN_PREFIX)
        }
        global_views, local_views = self.render(batch["frames"], plan)
        return {**rest, "global_views": global_views, "local_views": local_views}

    # -- rendering ------------------------------------------------------------------------------------------------

    def render(self, frames: Tensor, plan: ViewPlan) -> tuple[list[Tensor], list[Tensor]]:
        """G global views (B, T, 3, gs, gs) and L local views (B, T, 3, ls, ls), float32 normalised, from uint8
        ``frames`` (B, T, H, W, C >= 3) on the rendering device and the batch's ``plan`` on the CPU. With the
        transform's ``output_dtype="uint8"`` the views are quantised to 8 bits before the normalisation, as the CPU
        path's are."""
        t = self.transform
        B, T = frames.shape[:2]
        G, L, gs, ls = t.num_global_crops, t.num_local_crops, t.global_size, t.local_size
        device = frames.device
        image, shift = self._regions(frames, plan)  # (B, T, 3, h, w) float, (B, 4) float64 region origins
        h, w = image.shape[-2:]

        # global views: one box per clip and view, shared by the clip's T frames -> (B * G, 3T, gs, gs)
        gboxes = plan.global_boxes - shift.unsqueeze(1)  # (B, G, 4)
        index = torch.arange(B, dtype=torch.float64).repeat_interleave(G).unsqueeze(1)
        rois = torch.cat([index, gboxes.reshape(B * G, 4)], dim=1)
        global_out = self._roi_align(image.view(B, 3 * T, h, w), rois, gs).view(B, G, T, 3, gs, gs)
        gflip = plan.global_flip.to(device, non_blocking=True).view(B, G, 1, 1, 1, 1)
        global_out = torch.where(gflip, global_out.flip(-1), global_out).view(B * G * T, 3, gs, gs)

        # local views: one box per clip, view and frame, in an order that makes the colour subsets contiguous
        K = L * T
        lboxes = (plan.local_boxes - shift.unsqueeze(1)).reshape(B * K, 4)
        frame_of = (torch.arange(B).view(B, 1) * T + torch.arange(T).repeat(L).view(1, K)).reshape(B * K)
        u_local = plan.u_local.reshape(B * K, -1)
        clip_key, orders = self._order_keys(plan)  # (B,) one key per distinct jitter-op order (exact backend)
        group = colour_groups(u_local, t.jitter_prob, t.local_blur_prob)
        perm = torch.sort(clip_key.repeat_interleave(K) * 4 + group, stable=True).indices
        rois = torch.cat([frame_of[perm].to(torch.float64).unsqueeze(1), lboxes[perm]], dim=1)
        local_out = self._roi_align(image.view(B * T, 3, h, w), rois, ls)
        lflip = plan.local_flip.reshape(B * K)[perm].to(device, non_blocking=True).view(-1, 1, 1, 1)
        local_out = torch.where(lflip, local_out.flip(-1), local_out)
        del image

        blur_prob = per_image(t.global_blur_prob, T).repeat(B)
        global_out = self._colour(
            global_out,
            plan.u_global.reshape(B * G * T, -1),
            clip_key.repeat_interleave(G * T),
            orders,
            blur_prob,
            plan.solarized.reshape(B * G * T),
        )
        local_out = self._colour(
            local_out, u_local[perm], clip_key.repeat_interleave(K)[perm], orders, t.local_blur_prob, None
        )
        local_out = local_out.index_select(0, torch.argsort(perm).to(device, non_blocking=True))
        global_out = self._normalize(global_out).view(B, G, T, 3, gs, gs)
        local_out = self._normalize(local_out).view(B, L, T, 3, ls, ls)
        return list(global_out.unbind(1)), list(local_out.unbind(1))

    def _regions(self, frames: Tensor, plan: ViewPlan) -> tuple[Tensor, Tensor]:
        """Every clip's pre-crop region plus a 1-pixel margin (inside its own frame: padding never enters), float
        (B, T, 3, h, w) at the top left of a canvas of the largest region, each region's last row / column
        repeated beyond it (so bilinear samples near its edge see the edge pixels, as at a frame's edge); and each
        region's origin (x, y, x, y) in frame pixels, float64 (B, 4)."""
        B = frames.shape[0]
        x0, y0, x1, y1 = plan.pre_crop.to(torch.int64).unbind(1)
        height, width = plan.frame_size.to(torch.int64).unbind(1)
        cx0, cy0 = (x0 - 1).clamp(min=0), (y0 - 1).clamp(min=0)
        cx1, cy1 = torch.minimum(x1 + 1, width), torch.minimum(y1 + 1, height)
        h, w = int((cy1 - cy0).max()), int((cx1 - cx0).max())
        rows = cy0.view(B, 1) + torch.minimum(torch.arange(h).view(1, h), (cy1 - cy0 - 1).view(B, 1))
        cols = cx0.view(B, 1) + torch.minimum(torch.arange(w).view(1, w), (cx1 - cx0 - 1).view(B, 1))
        device = frames.device
        clip = torch.arange(B, device=device).view(B, 1, 1)
        rows, cols = rows.to(device, non_blocking=True), cols.to(device, non_blocking=True)
        pixels = frames[clip, :, rows.view(B, h, 1), cols.view(B, 1, w), :3]  # (B, h, w, T, 3)
        image = torch.empty(B, frames.shape[1], 3, h, w, device=device)
        image.copy_(pixels.permute(0, 3, 4, 1, 2))
        shift = torch.stack([cx0, cy0, cx0, cy0], dim=1).to(torch.float64)
        return image, shift

    _roi_align = staticmethod(roi_align_views)

    def _order_keys(self, plan: ViewPlan) -> tuple[Tensor, dict[int, list[int]]]:
        """(B,) int64 keys, equal for clips that share a jitter-op order (all 0 unless the backend is exact, the
        only one that uses the order), and each key's order."""
        B = plan.colour_order.shape[0]
        if self.colour.backend != "exact":
            return torch.zeros(B, dtype=torch.int64), {0: plan.colour_order[0].tolist()}
        orders, keys = torch.unique(plan.colour_order, dim=0, return_inverse=True)
        return keys, {k: order for k, order in enumerate(orders.tolist())}

    def _colour(
        self,
        img: Tensor,
        u: Tensor,
        keys: Tensor,
        orders: dict[int, list[int]],
        blur_prob: float | Tensor,
        solarized: Tensor | None,
    ) -> Tensor:
        """``colour_views`` of (N, 3, S, S) float images in [0, 255] on the device, once per distinct key of ``keys``
        (N,) with that key's jitter-op order; ``u``, ``keys``, a tensor ``blur_prob`` and ``solarized`` are per
        image, on the CPU."""
        if self.colour.backend == "fused":  # one call for all images, nothing read back from the device
            return fused_colour_views(img, u, blur_prob, self.colour, solarized)
        if keys.numel() == 0:
            order = next(iter(orders.values()))
            return colour_views(img, 255.0, u, order, blur_prob, self.colour, False, solarized)
        perm = None
        if keys.numel() > 1 and not bool((keys[1:] >= keys[:-1]).all()):  # group the images by key
            perm = torch.sort(keys, stable=True).indices
            keys, u = keys[perm], u[perm]
            img = img.index_select(0, perm.to(img.device, non_blocking=True))
            blur_prob = blur_prob[perm] if isinstance(blur_prob, Tensor) else blur_prob
            solarized = None if solarized is None else solarized[perm]
        values, counts = torch.unique_consecutive(keys, return_counts=True)
        parts, start = [], 0
        for key, count in zip(values.tolist(), counts.tolist(), strict=True):
            stop = start + count
            prob = blur_prob[start:stop] if isinstance(blur_prob, Tensor) else blur_prob
            solar = None if solarized is None else solarized[start:stop]
            part = colour_views(
                img[start:stop], 255.0, u[start:stop], orders[key], prob, self.colour, False, solar
            )
            parts.append(part)
            start = stop
        out = parts[0] if len(parts) == 1 else torch.cat(parts)
        if perm is not None:
            out = out.index_select(0, torch.argsort(perm).to(out.device, non_blocking=True))
        return out

    def _normalize(self, views: Tensor) -> Tensor:
        """Float32 normalised views (the colour ops' uint8 output, or their float32 output as it is)."""
        t = self.transform
        return normalize_views(views, t.mean, t.std) if views.dtype == torch.uint8 else views
