"""Tests for dora_lightning.data.augment.multicrop (clip multi-crop augmentation): output structure, normalisation,
determinism and the frames it accepts. Geometry, colour and argument checks are in tests/test_transforms_geometry.py,
tests/test_transforms_colour.py and tests/test_transforms_arguments.py.

Run ``python tests/test_transforms.py`` for a single-thread timing of one paper-scale clip (not a test).
"""

from __future__ import annotations

import time

import pytest
import torch
from multicrop_helpers import MEAN, NO_COLOUR, STD, gen, random_frames

from dora_lightning.data.augment.multicrop import COLOUR_BACKENDS, CROP_BACKENDS, ClipMultiCrop

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
