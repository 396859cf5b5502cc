"""Tests for dora_lightning.data.augment.multicrop (clip multi-crop augmentation).

Run ``python tests/test_transforms.py`` for a single-thread timing of one paper-scale clip (not a test).
"""

from __future__ import annotations

import math
import time

import pytest
import torch
import torch.nn.functional as F

from dora_lightning.data.augment.multicrop import COLOUR_BACKENDS, CROP_BACKENDS, ClipMultiCrop

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
# float32 output: the views normalised, with no uint8 quantisation, so crops compare to 1e-5
# (the float backend: the compiled one rounds every view to 8 bits, which the exact-resampling checks would see)
NO_COLOUR = dict(
    jitter_prob=0.0,
    grayscale_prob=0.0,
    global_blur_prob=0.0,
    local_blur_prob=0.0,
    output_dtype="float32",
    colour_backend="fused",
)
# roi_align crops, no flip, no colour ops: global views are plain (exact-box) resamplings of the frame.
PLAIN_ROI_ALIGN = dict(crop_backend="roi_align", global_flip_prob=0.0, **NO_COLOUR)


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
    frames = random_frames(T=4, H=37, W=91)
    for dtype in (torch.uint8, torch.float32):
        t = ClipMultiCrop(
            32, 16, 2, 3, pre_crop_size=40, crop_backend=backend, output_dtype=str(dtype).split(".")[-1]
        )
        out = t(frames, gen())
        assert set(out) == {"global_views", "local_views"}
        assert len(out["global_views"]) == 2 and len(out["local_views"]) == 3
        for v in out["global_views"]:
            assert v.shape == (4, 3, 32, 32) and v.dtype == dtype
        for v in out["local_views"]:
            assert v.shape == (4, 3, 16, 16) and v.dtype == dtype
        assert all(torch.isfinite(t.normalize(v)).all() for vs in out.values() for v in vs)


@pytest.mark.parametrize("colour_backend", COLOUR_BACKENDS)
def test_uint8_output_is_the_float_output_quantised(colour_backend):
    """The default uint8 hand-off, normalised on the device, equals the float32 output up to rounding."""
    frames = random_frames(T=3, H=48, W=64)
    kwargs = dict(global_size=32, local_size=16, num_local_crops=2, colour_backend=colour_backend)
    small = ClipMultiCrop(**kwargs)(frames, gen(3))
    full = ClipMultiCrop(**kwargs, output_dtype="float32")(frames, gen(3))
    normalise = ClipMultiCrop(**kwargs).normalize
    for key in small:
        for a, b in zip(small[key], full[key], strict=True):
            assert a.dtype == torch.uint8
            torch.testing.assert_close(normalise(a), b, rtol=0, atol=0.5 / 255 / 0.224 + 1e-5)
            assert torch.equal(normalise(b.clone()), b)  # float views pass through unchanged


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


def test_bad_frames():
    t = ClipMultiCrop(32, 16)
    with pytest.raises(ValueError, match="frames"):
        t(torch.zeros(2, 10, 10, 3), gen())
    with pytest.raises(ValueError, match="frames"):
        t(torch.zeros(2, 3, 10, 10, dtype=torch.uint8), gen())
    with pytest.raises(ValueError, match=r"\(T, H, W, 4\)"):
        t(torch.zeros(2, 10, 10, 2, dtype=torch.uint8), gen())


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"colour_backend": "fused"}, {"colour_backend": "exact"}, {"crop_backend": "roi_align"}],
)
def test_rgba_frames_give_the_rgb_frames_views(kwargs):
    """The fourth byte of RGBA frames is ignored: every backend gives the views of the RGB frames, bit for bit
    (the default backends read the RGBA crops in place, the others drop the fourth channel)."""
    t = ClipMultiCrop(32, 16, num_local_crops=3, pre_crop_size=40, **kwargs)
    rgb = torch.randint(0, 256, (3, 36, 52, 3), dtype=torch.uint8, generator=gen(7))
    rgba = torch.cat(
        [rgb, torch.randint(0, 256, (3, 36, 52, 1), dtype=torch.uint8, generator=gen(8))], dim=-1
    )
    for seed in range(4):
        want, got = t(rgb, gen(seed)), t(rgba, gen(seed))
        for key in ("global_views", "local_views"):
            for a, b in zip(want[key], got[key], strict=True):
                assert a.shape == b.shape and a.dtype == b.dtype and a.is_contiguous() and b.is_contiguous()
                assert torch.equal(a, b), (key, seed)


@pytest.mark.parametrize("kwargs", [{}, {"num_global_crops": 2}, {"crop_backend": "roi_align"}])
def test_a_list_of_frames_gives_the_stacked_frames_views(kwargs):
    """VideoClipStream hands ClipMultiCrop its frames unstacked: same views, bit for bit."""
    t = ClipMultiCrop(32, 16, num_local_crops=3, pre_crop_size=40, **kwargs)
    assert t.accepts_frame_list
    frames = torch.randint(0, 256, (3, 36, 52, 4), dtype=torch.uint8, generator=gen(5))
    for seed in range(4):
        want, got = t(frames, gen(seed)), t(list(frames.unbind(0)), gen(seed))
        for key in ("global_views", "local_views"):
            for a, b in zip(want[key], got[key], strict=True):
                assert torch.equal(a, b), (key, seed)


def test_bad_frame_lists():
    t = ClipMultiCrop(32, 16)
    frame = torch.zeros(10, 12, 3, dtype=torch.uint8)
    with pytest.raises(ValueError, match="one shape and dtype"):
        t([frame, torch.zeros(10, 14, 3, dtype=torch.uint8)], gen())
    with pytest.raises(ValueError, match="one shape and dtype"):
        t([frame, frame.float()], gen())
    with pytest.raises(ValueError, match="empty list"):
        t([], gen())
    with pytest.raises(ValueError, match="uint8"):
        t([frame.float()], gen())


def test_frame_format_is_rgba_only_for_the_packed_fast_path():
    assert ClipMultiCrop(32, 16).frame_format == "rgba"
    assert ClipMultiCrop(32, 16, colour_backend="fused").frame_format == "rgb24"
    assert ClipMultiCrop(32, 16, crop_backend="roi_align").frame_format == "rgb24"


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


# ---------------------------------------------------------------------------------------------------------------
# Colour
# ---------------------------------------------------------------------------------------------------------------


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
        ({"global_solarize_prob": 1.2}, "global_solarize_prob"),
        ({"local_flip_prob": -0.5}, "local_flip_prob"),
        ({"recipe": "simclr"}, "recipe"),
        ({"brightness": -0.1}, "brightness"),
        ({"contrast": -1.0}, "contrast"),
        ({"saturation": -0.5}, "saturation"),
        ({"hue": 0.6}, "hue"),
        ({"blur_sigma": (0.0, 1.0)}, "blur_sigma"),
        ({"blur_sigma": (2.0, 1.0)}, "blur_sigma"),
        ({"mean": (0.5, 0.5)}, "mean"),
        ({"std": (0.2, 0.2, 0.0)}, "std"),
        ({"crop_backend": "bicubic"}, "crop_backend"),
        ({"colour_backend": "hsv"}, "colour_backend"),
        ({"output_dtype": "float16"}, "output_dtype"),
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
    t = instantiate(parser.parse_args([*args, "--aug.crop_backend=roi_align"])).aug
    assert (t.global_size, t.local_scale, t.pre_crop_size, t.crop_backend) == (
        64,
        (0.1, 0.3),
        None,
        "roi_align",
    )
    assert parser.get_defaults().aug.local_size == 112
    assert parser.get_defaults().aug.crop_backend == "interpolate"
    with pytest.raises(jsonargparse.ArgumentError):
        parser.parse_args(["--aug.crop_backend=bicubic"])


def test_repr_lists_arguments():
    assert "local_scale=(0.05, 0.4)" in repr(ClipMultiCrop())


def test_default_crop_backend_is_interpolate():
    assert CROP_BACKENDS == ("roi_align", "interpolate")
    assert ClipMultiCrop().crop_backend == "interpolate"
    assert "crop_backend='interpolate'" in repr(ClipMultiCrop())


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
