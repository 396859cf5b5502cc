"""Tests for dora_lightning.data.transforms (clip multi-crop augmentation).

Run ``python tests/test_transforms.py`` for a single-thread timing of one paper-scale clip (not a test).
"""

from __future__ import annotations

import colorsys
import math
import time

import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms import RandomResizedCrop
from torchvision.transforms.v2 import functional as TF

from dora_lightning.data.transforms import (
    CROP_BACKENDS,
    ClipBoxes,
    ClipMultiCrop,
    adjust_brightness_,
    adjust_contrast_,
    adjust_hue_,
    adjust_saturation_,
    gaussian_blur,
    hsv_to_rgb,
    rgb_to_grayscale,
    rgb_to_hsv,
    sample_resized_crop_boxes,
)

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
NO_COLOUR = dict(jitter_prob=0.0, grayscale_prob=0.0, global_blur_prob=0.0, local_blur_prob=0.0)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_frames(T: int = 2, H: int = 60, W: int = 80, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (T, H, W, 3), dtype=torch.uint8, generator=gen(seed))


def smooth_frames(T: int, H: int, W: int) -> torch.Tensor:
    """A smooth colourful pattern, identical in every frame."""
    y = torch.linspace(0, 1, H).view(H, 1)
    x = torch.linspace(0, 1, W).view(1, W)
    rgb = torch.stack([x.expand(H, W), y.expand(H, W), 0.5 + 0.5 * torch.sin(7 * x + 5 * y)], dim=-1)
    return (rgb * 255).round().to(torch.uint8).expand(T, H, W, 3).contiguous()


def denormalise(view: torch.Tensor) -> torch.Tensor:
    """(..., 3, h, w) normalised view -> pixel values in 0..255."""
    return (view * STD + MEAN) * 255.0


# ---------------------------------------------------------------------------------------------------------------
# Output structure, normalisation, determinism
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", CROP_BACKENDS)
def test_output_keys_counts_shapes_dtype(backend):
    t = ClipMultiCrop(32, 16, num_global_crops=2, num_local_crops=3, pre_crop_size=40, crop_backend=backend)
    out = t(random_frames(T=4, H=37, W=91), gen())
    assert set(out) == {"global_views", "local_views"}
    assert len(out["global_views"]) == 2 and len(out["local_views"]) == 3
    for v in out["global_views"]:
        assert v.shape == (4, 3, 32, 32) and v.dtype == torch.float32
    for v in out["local_views"]:
        assert v.shape == (4, 3, 16, 16) and v.dtype == torch.float32
    assert all(torch.isfinite(v).all() for vs in out.values() for v in vs)


def test_no_local_crops():
    out = ClipMultiCrop(32, 16, num_local_crops=0)(random_frames(), gen())
    assert out["local_views"] == [] and len(out["global_views"]) == 1


@pytest.mark.parametrize("backend", CROP_BACKENDS)
def test_grey_frame_normalises_exactly(backend):
    frames = torch.full((3, 50, 70, 3), 128, dtype=torch.uint8)
    out = ClipMultiCrop(32, 16, num_local_crops=2, global_flip_prob=0.0, crop_backend=backend, **NO_COLOUR)(
        frames, gen()
    )
    expected = (128 / 255 - MEAN) / STD
    for v in out["global_views"] + out["local_views"]:
        torch.testing.assert_close(v, expected.expand(v.shape), rtol=0, atol=1e-6)


def test_custom_mean_std():
    frames = torch.full((1, 20, 20, 3), 51, dtype=torch.uint8)  # 0.2
    t = ClipMultiCrop(8, 4, num_local_crops=1, mean=(0.1, 0.2, 0.3), std=(0.5, 0.25, 0.1), **NO_COLOUR)
    g = t(frames, gen())["global_views"][0]
    torch.testing.assert_close(g[0, :, 0, 0], torch.tensor([0.2, 0.0, -1.0]), rtol=0, atol=1e-5)


@pytest.mark.parametrize("backend", CROP_BACKENDS)
def test_determinism(backend):
    t = ClipMultiCrop(32, 16, num_local_crops=2, crop_backend=backend)
    frames = random_frames(T=3, H=48, W=64)
    a, b, c = t(frames, gen(5)), t(frames, gen(5)), t(frames, gen(6))
    for key in a:
        for x, y in zip(a[key], b[key], strict=True):
            assert torch.equal(x, y)
    assert not all(torch.equal(x, y) for key in a for x, y in zip(a[key], c[key], strict=True))
    assert not torch.equal(a["global_views"][0], c["global_views"][0])


def test_sample_boxes_is_first_draw():
    t = ClipMultiCrop(32, 16, num_local_crops=2)
    b1, b2 = t.sample_boxes(3, 48, 64, gen(1)), t.sample_boxes(3, 48, 64, gen(1))
    assert torch.equal(b1.local_boxes, b2.local_boxes) and torch.equal(b1.pre_crop, b2.pre_crop)
    # Changing probabilities does not change the geometry drawn from the same seed.
    b3 = ClipMultiCrop(32, 16, num_local_crops=2, global_flip_prob=1.0, jitter_prob=0.0).sample_boxes(
        3, 48, 64, gen(1)
    )
    assert torch.equal(b1.local_boxes, b3.local_boxes) and torch.equal(b1.global_boxes, b3.global_boxes)
    assert b3.global_flip.all()


def test_bad_frames():
    t = ClipMultiCrop(32, 16)
    with pytest.raises(ValueError, match="frames"):
        t(torch.zeros(2, 10, 10, 3), gen())
    with pytest.raises(ValueError, match="frames"):
        t(torch.zeros(2, 3, 10, 10, dtype=torch.uint8), gen())


# ---------------------------------------------------------------------------------------------------------------
# Geometry
# ---------------------------------------------------------------------------------------------------------------


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


def test_colour_is_per_frame():
    T = 6
    t = ClipMultiCrop(32, 16, num_local_crops=1, jitter_prob=1.0, global_flip_prob=0.0)
    view = t(smooth_frames(T, 60, 60), gen())["global_views"][0]
    assert all(not torch.allclose(view[i], view[0]) for i in range(1, T))


def ramp_frames(T: int, H: int, W: int) -> torch.Tensor:
    """R = column index, G = row index, B = 40 * frame index (needs H, W <= 256, T <= 6)."""
    x = torch.arange(W).view(1, W).expand(H, W)
    y = torch.arange(H).view(H, 1).expand(H, W)
    frames = torch.stack([x, y, torch.zeros_like(x)], dim=-1).expand(T, H, W, 3).clone()
    frames[..., 2] = 40 * torch.arange(T).view(T, 1, 1)
    return frames.to(torch.uint8)


def sample_positions(lo: float, hi: float, size: int, extent: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Centre positions (pixel-index space) of ``size`` output pixels of box edge [lo, hi], and which of them have
    all roi_align samples of their bin inside [0, extent - 1] (where a linear ramp is reproduced exactly)."""
    j = torch.arange(size, dtype=torch.float64)
    step = (hi - lo) / size
    centre = lo + (j + 0.5) * step - 0.5
    valid = (lo + j * step - 0.5 >= 0) & (lo + (j + 1) * step - 0.5 <= extent - 1)
    return centre, valid


def check_ramp(
    view: torch.Tensor,
    box: torch.Tensor,
    flip: bool,
    frame: int,
    W: int,
    H: int,
    atol: float,
    margin: int = 0,
) -> int:
    """Compare one (3, s, s) view of ``ramp_frames`` with the positions predicted from its frame box and frame."""
    s = view.shape[-1]
    px = denormalise(view).double()
    torch.testing.assert_close(px[2], torch.full_like(px[2], 40.0 * frame), rtol=0, atol=atol)
    x0, y0, x1, y1 = box.tolist()
    cx, vx = sample_positions(x0, x1, s, W)
    cy, vy = sample_positions(y0, y1, s, H)
    if margin:
        vx[:margin] = vx[-margin:] = False
        vy[:margin] = vy[-margin:] = False
    red, green = px[0], px[1]
    if flip:
        red, green = red.flip(-1), green.flip(-1)
    mask = vy.view(-1, 1) & vx.view(1, -1)
    torch.testing.assert_close(red[mask], cx.view(1, -1).expand(s, s)[mask], rtol=0, atol=atol)
    torch.testing.assert_close(green[mask], cy.view(-1, 1).expand(s, s)[mask], rtol=0, atol=atol)
    return int(mask.sum())


# Jitter "applied" to half the images but with zero strength: pixels unchanged, while the internal grouping of
# the local images by jitter decision (and its undoing) is exercised.
NEUTRAL_JITTER = {
    **NO_COLOUR,
    "jitter_prob": 0.5,
    "brightness": 0.0,
    "contrast": 0.0,
    "saturation": 0.0,
    "hue": 0.0,
}


@pytest.mark.parametrize("pre_crop_size, colour", [(None, NO_COLOUR), (50, NO_COLOUR), (300, NEUTRAL_JITTER)])
def test_roi_align_geometry_matches_boxes(pre_crop_size, colour):
    """Every output pixel of every view sits where its composed frame box says (exact on a linear ramp)."""
    T, H, W = 3, 150, 200
    t = ClipMultiCrop(40, 24, num_global_crops=2, num_local_crops=2, pre_crop_size=pre_crop_size, **colour)
    frames = ramp_frames(T, H, W)
    checked = 0
    for seed in range(4):
        boxes = t.sample_boxes(T, H, W, gen(seed))
        out = t(frames, gen(seed))
        gboxes, lboxes = boxes.to_frame(boxes.global_boxes), boxes.to_frame(boxes.local_boxes)
        for v, view in enumerate(out["global_views"]):
            for f in range(T):
                checked += check_ramp(view[f], gboxes[v], bool(boxes.global_flip[v]), f, W, H, atol=2e-3)
        for v, view in enumerate(out["local_views"]):
            for f in range(T):
                checked += check_ramp(view[f], lboxes[v, f], False, f, W, H, atol=2e-3)
    assert checked > 0.9 * 4 * T * (2 * 40 * 40 + 2 * 24 * 24)


def test_interpolate_geometry_matches_rounded_boxes():
    T, H, W = 2, 150, 200
    t = ClipMultiCrop(40, 24, num_local_crops=2, pre_crop_size=80, crop_backend="interpolate", **NO_COLOUR)
    frames = ramp_frames(T, H, W)
    for seed in range(4):
        boxes = t.sample_boxes(T, H, W, gen(seed))
        out = t(frames, gen(seed))
        gbox, gflip = boxes.to_frame(boxes.global_boxes)[0], bool(boxes.global_flip[0])
        views = [(out["global_views"][0][f], gbox, gflip, f) for f in range(T)]
        lboxes = boxes.to_frame(boxes.local_boxes)
        views += [(out["local_views"][v][f], lboxes[v, f], False, f) for v in range(2) for f in range(T)]
        for view, box, flip, frame in views:
            rounded = torch.floor(box + 0.5)
            s = view.shape[-1]
            margin = math.ceil(0.5 * s / float((rounded[2:] - rounded[:2]).min())) + 2
            # uint8 output: +-0.5 rounding, plus fixed-point filter weights
            assert check_ramp(view, rounded, flip, frame, W, H, atol=0.75, margin=margin) > 0


def test_global_crop_equals_reference_resize():
    """Whole square frame (scale (1, 1) forces the full-frame fallback), no pre-crop: plain resizes."""
    frames = random_frames(T=2, H=64, W=64)
    x = frames.permute(0, 3, 1, 2).float() / 255
    for size, reference in [
        (32, F.avg_pool2d(x, 2)),  # 2x shrink: 2x2 samples per bin at pixel centres
        (96, F.interpolate(x, size=(96, 96), mode="bilinear", align_corners=False)),
        (64, x),
    ]:
        t = ClipMultiCrop(
            size, 16, pre_crop_size=None, global_scale=(1.0, 1.0), global_flip_prob=0.0, **NO_COLOUR
        )
        boxes = t.sample_boxes(2, 64, 64, gen())
        assert boxes.global_boxes.tolist() == [[0.0, 0.0, 64.0, 64.0]]
        view = t(frames, gen())["global_views"][0]
        torch.testing.assert_close(denormalise(view) / 255, reference, rtol=0, atol=1e-5)


def test_global_crop_equals_reference_crop_and_resize():
    """A sampled (non-full) box, upsampled: equals F.interpolate of the cropped frame away from the crop border."""
    H, W, size = 40, 50, 64
    frames = random_frames(T=1, H=H, W=W, seed=3)
    t = ClipMultiCrop(
        size, 16, pre_crop_size=None, global_scale=(0.3, 0.6), global_flip_prob=0.0, **NO_COLOUR
    )
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
    """pre_crop_size 128 with scale (1, 1) on a square frame: pre-crop = whole frame (x2), global = whole pre-crop."""
    frames = random_frames(T=1, H=64, W=64)
    t = ClipMultiCrop(
        96,
        16,
        pre_crop_size=128,
        pre_crop_scale=(1, 1),
        global_scale=(1, 1),
        global_flip_prob=0.0,
        **NO_COLOUR,
    )
    boxes = t.sample_boxes(1, 64, 64, gen())
    assert boxes.pre_crop.tolist() == [0, 0, 64, 64] and boxes.region_size == (128, 128)
    assert boxes.to_frame(boxes.global_boxes).tolist() == [[0, 0, 64, 64]]
    view = denormalise(t(frames, gen())["global_views"][0]) / 255
    reference = F.interpolate(frames.permute(0, 3, 1, 2).float() / 255, size=(96, 96), mode="bilinear")
    torch.testing.assert_close(view, reference, rtol=0, atol=1e-5)


def test_to_frame():
    boxes = ClipBoxes(
        frame_size=(100, 200),
        pre_crop=torch.tensor([10.0, 20.0, 110.0, 70.0], dtype=torch.float64),
        region_size=(300, 300),
        global_boxes=torch.tensor(
            [[0.0, 0.0, 300.0, 300.0], [150.0, 150.0, 300.0, 300.0]], dtype=torch.float64
        ),
        global_flip=torch.tensor([False, True]),
        local_boxes=torch.zeros(0, 1, 4, dtype=torch.float64),
    )
    assert boxes.to_frame(boxes.global_boxes).tolist() == [[10, 20, 110, 70], [60, 45, 110, 70]]


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
            torch.testing.assert_close(a, b)  # no flip on locals


def test_boxes_inside_frame_and_scale_ranges():
    t = ClipMultiCrop(num_global_crops=2, num_local_crops=6)
    ratio_lo, ratio_hi = 3 / 4, 4 / 3
    for seed, (H, W) in enumerate([(256, 455), (455, 256), (90, 90), (31, 500)]):
        for s in range(40):
            b = t.sample_boxes(8, H, W, gen(100 * seed + s))
            pre = b.pre_crop
            assert 0 <= pre[0] < pre[2] <= W and 0 <= pre[1] < pre[3] <= H
            assert b.region_size == (300, 300)
            for boxes, (lo, hi) in [
                (b.global_boxes, t.global_scale),
                (b.local_boxes.view(-1, 4), t.local_scale),
            ]:
                assert (boxes[:, :2] >= 0).all() and (boxes[:, 2:] <= 300).all()
                assert (boxes[:, 2:] > boxes[:, :2]).all()
                w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
                area = w * h / 300**2
                slack = 2 * (w + h + 1) / 300**2  # rounding of w and h to integers
                assert ((area >= lo - slack) & (area <= hi + slack)).all()
                assert ((w / h >= ratio_lo * (1 - 2 / h)) & (w / h <= ratio_hi * (1 + 2 / h))).all()
                frame = b.to_frame(boxes)
                eps = 1e-9
                assert (frame[:, 0] >= pre[0] - eps).all() and (frame[:, 2] <= pre[2] + eps).all()
                assert (frame[:, 1] >= pre[1] - eps).all() and (frame[:, 3] <= pre[3] + eps).all()
            area = (pre[2] - pre[0]) * (pre[3] - pre[1]) / (H * W)
            if pre.tolist() != fallback_box(H, W):  # the centre-crop fallback may be outside the scale range
                slack = 2 * float(pre[2] - pre[0] + pre[3] - pre[1] + 1) / (H * W)
                assert t.pre_crop_scale[0] - slack <= area <= 1.0 + 1e-9


def fallback_box(H: int, W: int) -> list[float]:
    """torchvision's RandomResizedCrop fallback: centred crop with the aspect ratio clamped into [3/4, 4/3]."""
    w, h = W, H
    if W / H < 3 / 4:
        h = round(W / (3 / 4))
    elif W / H > 4 / 3:
        w = round(H * 4 / 3)
    x0, y0 = (W - w) // 2, (H - h) // 2
    return [x0, y0, x0 + w, y0 + h]


def test_resized_crop_distribution_matches_torchvision():
    """Same algorithm as torchvision's RandomResizedCrop.get_params: compare statistics over many draws."""
    H, W, scale, n = 60, 200, (0.2, 1.0), 4000
    ours = sample_resized_crop_boxes(torch.rand(n, 10, 4, generator=gen(), dtype=torch.float64), H, W, scale)
    torch.manual_seed(0)
    ref = torch.tensor(
        [RandomResizedCrop.get_params(torch.empty(1, H, W), list(scale), [3 / 4, 4 / 3]) for _ in range(n)]
    )
    ref_w, ref_h, ref_y, ref_x = (
        ref[:, 3].double(),
        ref[:, 2].double(),
        ref[:, 0].double(),
        ref[:, 1].double(),
    )
    our_w, our_h, our_x, our_y = ours[:, 2] - ours[:, 0], ours[:, 3] - ours[:, 1], ours[:, 0], ours[:, 1]
    for a, b, tol in [(our_w, ref_w, 2.0), (our_h, ref_h, 1.0), (our_x, ref_x, 3.0), (our_y, ref_y, 0.6)]:
        assert abs(a.mean() - b.mean()) < tol, (a.mean(), b.mean())
        assert abs(a.std() - b.std()) < 2 * tol
    fallback = (our_w == 60 * 4 / 3) & (our_h == 60)  # too wide for every attempt: centre crop, ratio clamped
    ref_fallback = (ref_w == 80) & (ref_h == 60) & (ref_x == 60)
    assert abs(fallback.double().mean() - ref_fallback.double().mean()) < 0.03


def test_resized_crop_fallback():
    u = torch.rand(5, 10, 4, generator=gen(), dtype=torch.float64)
    # scale (1, 1) on a square: only ratio 1 fits, so (almost surely) every attempt fails -> whole image
    assert sample_resized_crop_boxes(u, 50, 50, (1.0, 1.0)).tolist() == [[0, 0, 50, 50]] * 5
    # on a 4:1 image the fallback is a centred 4:3 crop of full height
    assert sample_resized_crop_boxes(u, 30, 120, (1.0, 1.0)).tolist() == [[40, 0, 80, 30]] * 5
    assert fallback_box(30, 120) == [40, 0, 80, 30] and fallback_box(120, 30) == [0, 40, 30, 80]


def test_flip_probability():
    t = ClipMultiCrop(num_global_crops=4, num_local_crops=0, global_flip_prob=0.3)
    flips = torch.cat([t.sample_boxes(1, 64, 64, gen(s)).global_flip for s in range(500)])
    assert abs(flips.double().mean() - 0.3) < 0.04


# ---------------------------------------------------------------------------------------------------------------
# Colour ops
# ---------------------------------------------------------------------------------------------------------------


def random_images(n: int = 6, size: int = 17, seed: int = 0) -> torch.Tensor:
    x = torch.rand(n, 3, size, size, generator=gen(seed))
    x[0] = x[0].round()  # pure colours / black / white
    x[1, :, :5] = 0.5  # grey (chroma 0)
    x[2, 1] = x[2, 0]  # ties between channels
    return x


def luma(x: torch.Tensor) -> torch.Tensor:
    return (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)


def test_grayscale():
    x = random_images()
    grey = rgb_to_grayscale(x)
    assert grey.shape == (6, 1, 17, 17)
    torch.testing.assert_close(grey, luma(x))
    assert torch.equal(rgb_to_grayscale(torch.ones(1, 3, 2, 2)), torch.ones(1, 1, 2, 2))


def test_grayscale_views_have_equal_channels():
    t = ClipMultiCrop(
        24, 12, num_local_crops=2, jitter_prob=0.0, grayscale_prob=1.0, mean=(0, 0, 0), std=(1, 1, 1)
    )
    out = t(random_frames(T=2, H=40, W=40), gen())
    for v in out["global_views"] + out["local_views"]:
        torch.testing.assert_close(v[:, 0], v[:, 1], rtol=0, atol=1e-6)
        torch.testing.assert_close(v[:, 0], v[:, 2], rtol=0, atol=1e-6)


def test_brightness():
    x = torch.full((3, 3, 4, 4), 0.5)
    out = adjust_brightness_(x.clone(), torch.tensor([0.5, 1.0, 3.0]))
    assert torch.equal(out[:, 0, 0, 0], torch.tensor([0.25, 0.5, 1.0]))  # clamped at 1
    y = random_images()
    f = torch.linspace(0.6, 1.4, 6)
    torch.testing.assert_close(adjust_brightness_(y.clone(), f), (y * f.view(-1, 1, 1, 1)).clamp(0, 1))


def test_contrast():
    x = random_images()
    f = torch.linspace(0.0, 1.4, 6)
    mean = luma(x).mean(dim=(1, 2, 3), keepdim=True)
    expected = (f.view(-1, 1, 1, 1) * x + (1 - f.view(-1, 1, 1, 1)) * mean).clamp(0, 1)
    out = adjust_contrast_(x.clone(), f)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(out[0], mean[0].expand(3, 17, 17))  # factor 0: flat grey
    torch.testing.assert_close(adjust_contrast_(x.clone(), torch.ones(6)), x)


def test_saturation():
    x = random_images()
    f = torch.linspace(0.0, 1.2, 6)
    expected = (f.view(-1, 1, 1, 1) * x + (1 - f.view(-1, 1, 1, 1)) * luma(x)).clamp(0, 1)
    out = adjust_saturation_(x.clone(), f)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(out[0], luma(x[:1])[0].expand(3, 17, 17))  # factor 0: grayscale


def test_rgb_hsv_against_colorsys_and_round_trip():
    x = random_images(n=4, size=9)
    hsv = rgb_to_hsv(x)
    pixels = x.permute(0, 2, 3, 1).reshape(-1, 3).tolist()
    expected = torch.tensor([colorsys.rgb_to_hsv(*p) for p in pixels]).view(4, 9, 9, 3).permute(0, 3, 1, 2)
    torch.testing.assert_close(hsv, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(hsv_to_rgb(hsv), x, rtol=0, atol=1e-5)
    primaries = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0]]).view(4, 3, 1, 1)
    torch.testing.assert_close(rgb_to_hsv(primaries)[:, 0].flatten(), torch.tensor([0, 1 / 3, 2 / 3, 1 / 6]))


def test_hue_zero_is_identity_and_matches_torchvision():
    x = random_images(n=8)
    torch.testing.assert_close(adjust_hue_(x.clone(), torch.zeros(8)), x, rtol=0, atol=1e-5)
    shifts = torch.tensor([-0.5, -0.3, -0.1, 0.05, 0.1, 0.25, 0.4, 0.5])
    expected = torch.stack([TF.adjust_hue(x[i], float(shifts[i])) for i in range(8)])
    torch.testing.assert_close(adjust_hue_(x.clone(), shifts), expected, rtol=0, atol=1e-5)
    # shifting back undoes a shift; two half turns are the identity
    torch.testing.assert_close(adjust_hue_(adjust_hue_(x.clone(), shifts), -shifts), x, rtol=0, atol=1e-5)
    half = torch.full((8,), 0.5)
    torch.testing.assert_close(adjust_hue_(adjust_hue_(x.clone(), half), half), x, rtol=0, atol=1e-5)


def test_gaussian_blur_matches_reference():
    x = random_images(n=4, size=20)
    sigma = torch.tensor([0.1, 0.5, 1.3, 2.0])
    out = gaussian_blur(x, sigma)
    for i in range(4):
        k = 2 * math.ceil(3 * float(sigma[i])) + 1
        expected = TF.gaussian_blur(x[i], kernel_size=[k, k], sigma=[float(sigma[i])] * 2)
        torch.testing.assert_close(out[i], expected, rtol=0, atol=1e-5)
    # constant images are unchanged; the kernel radius is capped to fit reflect padding on tiny images
    torch.testing.assert_close(
        gaussian_blur(torch.full((2, 3, 3, 3), 0.7), torch.tensor([2.0, 0.3])), torch.full((2, 3, 3, 3), 0.7)
    )


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


# ---------------------------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"global_size": 0}, "global_size"),
        ({"local_size": -3}, "local_size"),
        ({"global_size": 2.5}, "global_size"),
        ({"pre_crop_size": 0}, "pre_crop_size"),
        ({"num_global_crops": 0}, "num_global_crops"),
        ({"num_local_crops": -1}, "num_local_crops"),
        ({"pre_crop_scale": (0.0, 1.0)}, "pre_crop_scale"),
        ({"global_scale": (0.6, 0.5)}, "global_scale"),
        ({"local_scale": (0.1, 1.5)}, "local_scale"),
        ({"local_scale": (0.1,)}, "local_scale"),
        ({"global_flip_prob": 1.5}, "global_flip_prob"),
        ({"jitter_prob": -0.1}, "jitter_prob"),
        ({"grayscale_prob": 2.0}, "grayscale_prob"),
        ({"global_blur_prob": -1.0}, "global_blur_prob"),
        ({"local_blur_prob": float("nan")}, "local_blur_prob"),
        ({"brightness": -0.1}, "brightness"),
        ({"contrast": -1.0}, "contrast"),
        ({"saturation": -0.5}, "saturation"),
        ({"hue": 0.6}, "hue"),
        ({"blur_sigma": (0.0, 1.0)}, "blur_sigma"),
        ({"blur_sigma": (2.0, 1.0)}, "blur_sigma"),
        ({"mean": (0.5, 0.5)}, "mean"),
        ({"std": (0.2, 0.2, 0.0)}, "std"),
        ({"crop_backend": "bicubic"}, "crop_backend"),
    ],
)
def test_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        ClipMultiCrop(**kwargs)


def test_configurable_with_jsonargparse():
    """LightningCLI exposes the typed __init__ arguments through jsonargparse."""
    jsonargparse = pytest.importorskip("jsonargparse")
    parser = jsonargparse.ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(ClipMultiCrop, "aug")
    args = ["--aug.global_size=64", "--aug.local_scale=[0.1, 0.3]", "--aug.pre_crop_size=null"]
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes  # renamed in 4.49
    t = instantiate(parser.parse_args([*args, "--aug.crop_backend=interpolate"])).aug
    assert (t.global_size, t.local_scale, t.pre_crop_size, t.crop_backend) == (
        64,
        (0.1, 0.3),
        None,
        "interpolate",
    )
    assert parser.get_defaults().aug.local_size == 112
    with pytest.raises(jsonargparse.ArgumentError):
        parser.parse_args(["--aug.crop_backend=bicubic"])


def test_repr_lists_arguments():
    assert "local_scale=(0.05, 0.4)" in repr(ClipMultiCrop())


# ---------------------------------------------------------------------------------------------------------------
# Timing (by hand): python tests/test_transforms.py
# ---------------------------------------------------------------------------------------------------------------


def _time_clip(backend: str, clips: int = 30) -> tuple[float, float]:
    torch.set_num_threads(1)
    t = ClipMultiCrop(crop_backend=backend)  # paper scale: 224 / 112, 1 global + 6 locals, pre-crop 300
    frames = torch.randint(0, 256, (8, 256, 455, 3), dtype=torch.uint8, generator=gen())
    g = gen()
    for _ in range(3):
        t(frames, g)
    wall, cpu = [], []
    for _ in range(clips):
        w0, c0 = time.perf_counter(), time.process_time()
        t(frames, g)
        wall.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
    return 1000 * sorted(wall)[clips // 2], 1000 * sorted(cpu)[clips // 2]


if __name__ == "__main__":
    for backend in CROP_BACKENDS:
        wall_ms, cpu_ms = _time_clip(backend)
        print(
            f"{backend:12s} T=8 256x455 -> 224 + 6x112, 1 thread: median {wall_ms:.1f} ms/clip wall, {cpu_ms:.1f} ms CPU"
        )
