"""Tests for dora_lightning.data.augment.crop_boxes: RandomResizedCrop box sampling, the clip's box composition, and that
ClipMultiCrop's views (both crop backends) land exactly on the composed frame boxes."""

from __future__ import annotations

import math

import pytest
import torch
from multicrop_helpers import NO_COLOUR, denormalise  # shared clip-test helpers (tests/ is on sys.path)
from torchvision.transforms import RandomResizedCrop

from dora_lightning.data.augment.crop_boxes import ClipBoxes, pixel_box, sample_resized_crop_boxes
from dora_lightning.data.augment.multicrop import ClipMultiCrop


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------------------------
# RandomResizedCrop boxes
# ---------------------------------------------------------------------------------------------------------------


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


def test_pixel_box_rounds_and_clamps():
    assert pixel_box([10.4, 20.5, 30.49, 40.6], 100, 100) == (10, 21, 30, 41)
    # clamped to the frame, and never empty
    assert pixel_box([-3.0, -0.2, 120.0, 0.3], 50, 100) == (0, 0, 100, 1)
    assert pixel_box([99.7, 49.9, 99.8, 50.0], 50, 100) == (99, 49, 100, 50)


# ---------------------------------------------------------------------------------------------------------------
# Clip geometry: pre-crop, global and local boxes, composition into frame coordinates
# ---------------------------------------------------------------------------------------------------------------


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


def test_flip_probability():
    t = ClipMultiCrop(num_global_crops=4, num_local_crops=0, global_flip_prob=0.3)
    flips = torch.cat([t.sample_boxes(1, 64, 64, gen(s)).global_flip for s in range(500)])
    assert abs(flips.double().mean() - 0.3) < 0.04


# ---------------------------------------------------------------------------------------------------------------
# Views land on their composed frame boxes (both crop backends)
# ---------------------------------------------------------------------------------------------------------------


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
    t = ClipMultiCrop(
        40,
        24,
        num_global_crops=2,
        num_local_crops=2,
        pre_crop_size=pre_crop_size,
        crop_backend="roi_align",
        **colour,
    )
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
