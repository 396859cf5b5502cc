"""ClipMultiCrop's geometry: global crops shared by a clip's frames and local ones per frame, crops equal to reference
resizes and crop-and-resizes, the pre-crop's composition, and flips."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from multicrop_helpers import NO_COLOUR, PLAIN_ROI_ALIGN, denormalise, gen, random_frames, smooth_frames

from dora_lightning.data.augment.multicrop import CROP_BACKENDS, ClipMultiCrop


@pytest.mark.parametrize("backend", CROP_BACKENDS)
def test_global_geometry_shared_local_per_frame(backend):
    T = 4
    frames = smooth_frames(T, 90, 120)
    t = ClipMultiCrop(
        48, 24, num_global_crops=2, num_local_crops=3, pre_crop_size=64, crop_backend=backend, **NO_COLOUR
    )
    for seed in range(3):
        out = t(frames, gen(seed))
        for view in out["global_views"]:
            for i in range(1, T):
                assert torch.equal(view[i], view[0])
        for view in out["local_views"]:
            assert not torch.allclose(view[1], view[0])


def test_global_crop_equals_reference_resize():
    """roi_align, whole square frame (scale (1, 1) forces the full-frame fallback), no pre-crop: plain resizes."""
    frames = random_frames(T=2, H=64, W=64)
    x = frames.permute(0, 3, 1, 2).float() / 255
    for size, reference in [
        (32, F.avg_pool2d(x, 2)),  # 2x shrink: 2x2 samples per bin at pixel centres
        (96, F.interpolate(x, size=(96, 96), mode="bilinear", align_corners=False)),
        (64, x),
    ]:
        t = ClipMultiCrop(size, 16, pre_crop_size=None, global_scale=(1.0, 1.0), **PLAIN_ROI_ALIGN)
        boxes = t.sample_boxes(2, 64, 64, gen())
        assert boxes.global_boxes.tolist() == [[0.0, 0.0, 64.0, 64.0]]
        view = t(frames, gen())["global_views"][0]
        torch.testing.assert_close(denormalise(view) / 255, reference, rtol=0, atol=1e-5)


def test_global_crop_equals_reference_crop_and_resize():
    """roi_align, sampled (non-full) box, upsampled: equals F.interpolate of the crop away from the crop border."""
    H, W, size = 40, 50, 64
    frames = random_frames(T=1, H=H, W=W, seed=3)
    t = ClipMultiCrop(size, 16, pre_crop_size=None, global_scale=(0.3, 0.6), **PLAIN_ROI_ALIGN)
    for seed in range(5):
        x0, y0, x1, y1 = (int(v) for v in t.sample_boxes(1, H, W, gen(seed)).global_boxes[0].tolist())
        crop = frames[:, y0:y1, x0:x1].permute(0, 3, 1, 2).float() / 255
        reference = F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False)[0]
        view = denormalise(t(frames, gen(seed))["global_views"][0][0]) / 255
        # Inside the crop both interpolate the same pixels; at the border roi_align may use the pixel next to the
        # crop where F.interpolate clamps, so compare an inner window.
        my, mx = math.ceil(size / (y1 - y0)) + 1, math.ceil(size / (x1 - x0)) + 1
        torch.testing.assert_close(view[:, my:-my, mx:-mx], reference[:, my:-my, mx:-mx], rtol=0, atol=1e-5)
        assert (view - reference).abs().mean() < 0.02


def test_pre_crop_composition():
    """roi_align, pre_crop_size 128 with scale (1, 1) on a square frame: pre-crop = whole frame (x2), global = whole
    pre-crop."""
    frames = random_frames(T=1, H=64, W=64)
    t = ClipMultiCrop(
        96, 16, pre_crop_size=128, pre_crop_scale=(1, 1), global_scale=(1, 1), **PLAIN_ROI_ALIGN
    )
    boxes = t.sample_boxes(1, 64, 64, gen())
    assert boxes.pre_crop.tolist() == [0, 0, 64, 64] and boxes.region_size == (128, 128)
    assert boxes.to_frame(boxes.global_boxes).tolist() == [[0, 0, 64, 64]]
    view = denormalise(t(frames, gen())["global_views"][0]) / 255
    reference = F.interpolate(frames.permute(0, 3, 1, 2).float() / 255, size=(96, 96), mode="bilinear")
    torch.testing.assert_close(view, reference, rtol=0, atol=1e-5)


@pytest.mark.parametrize("backend", CROP_BACKENDS)
def test_flip_mirrors_global_view(backend):
    frames = random_frames(T=3, H=64, W=96)
    kwargs = dict(global_size=40, local_size=16, num_global_crops=2, num_local_crops=2, crop_backend=backend)
    for seed in range(3):
        plain = ClipMultiCrop(global_flip_prob=0.0, **kwargs)(frames, gen(seed))
        flipped = ClipMultiCrop(global_flip_prob=1.0, **kwargs)(frames, gen(seed))  # colour ops on too
        for a, b in zip(plain["global_views"], flipped["global_views"], strict=True):
            torch.testing.assert_close(b, a.flip(-1), rtol=0, atol=1e-4)
            assert not torch.allclose(a, b)
        for a, b in zip(plain["local_views"], flipped["local_views"], strict=True):
            torch.testing.assert_close(a, b)  # local flips are local_flip_prob's (0 by default)
