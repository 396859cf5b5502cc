"""ClipMultiCrop's colour ops: drawn per frame, grayscale, left alone when not selected, and the compiled colour
backend against the fused one."""

from __future__ import annotations

import pytest
import torch
from multicrop_helpers import NO_COLOUR, gen, random_frames, smooth_frames

from dora_lightning.data.augment.multicrop import CROP_BACKENDS, ClipMultiCrop


def test_colour_is_per_frame():
    T = 6
    t = ClipMultiCrop(32, 16, num_local_crops=1, jitter_prob=1.0, global_flip_prob=0.0)
    view = t(smooth_frames(T, 60, 60), gen())["global_views"][0]
    assert all(not torch.allclose(view[i], view[0]) for i in range(1, T))


def test_grayscale_views_have_equal_channels():
    t = ClipMultiCrop(
        24, 12, num_local_crops=2, jitter_prob=0.5, grayscale_prob=1.0, mean=(0, 0, 0), std=(1, 1, 1)
    )
    out = t(random_frames(T=2, H=40, W=40), gen())
    for v in out["global_views"] + out["local_views"]:
        assert torch.equal(v[:, 0], v[:, 1]) and torch.equal(v[:, 0], v[:, 2])  # uint8: exactly equal


def test_colour_ops_leave_unselected_images_alone():
    """jitter/gray/blur probabilities 0 -> the crop alone; probability 1 -> every image changed."""
    frames = smooth_frames(2, 64, 64)
    base = dict(global_size=32, local_size=16, num_local_crops=2, global_flip_prob=0.0)
    plain = ClipMultiCrop(**base, **NO_COLOUR)(frames, gen())
    for name in ["jitter_prob", "grayscale_prob", "local_blur_prob"]:
        out = ClipMultiCrop(**base, **{**NO_COLOUR, name: 1.0})(frames, gen())
        for a, b in zip(plain["local_views"], out["local_views"], strict=True):
            assert all(not torch.allclose(a[f], b[f]) for f in range(2)), name
        if name == "local_blur_prob":  # global views are not blurred
            torch.testing.assert_close(out["global_views"][0], plain["global_views"][0], rtol=0, atol=0)


@pytest.mark.parametrize("crop_backend", CROP_BACKENDS)
def test_compiled_backend_is_the_fused_backend_in_8_bits(crop_backend):
    """Same draws, same maps: the compiled backend rounds to uint8 after the colour map and again after the blur
    (as PIL's pipeline does), the fused one once at the end, so they differ by at most one level (two where a
    blurred view's double rounding adds up)."""
    frames = random_frames(T=4, H=60, W=80)
    kwargs = dict(
        global_size=32, local_size=16, num_local_crops=3, local_blur_prob=0.7, crop_backend=crop_backend
    )
    compiled = ClipMultiCrop(**kwargs, colour_backend="compiled")(frames, gen(4))
    fused = ClipMultiCrop(**kwargs, colour_backend="fused")(frames, gen(4))
    for key in compiled:
        for a, b in zip(compiled[key], fused[key], strict=True):
            assert a.dtype == b.dtype == torch.uint8
            diff = (a.int() - b.int()).abs()
            assert diff.max() <= 2 and diff.float().mean() < 0.3, (key, diff.max(), diff.float().mean())
