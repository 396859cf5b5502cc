"""Tests of ClipMultiCrop's per-view probabilities, solarisation, local flips and recipes ("dora", "dino")."""

from __future__ import annotations

import pytest
import torch

from dora_lightning.data.augment.colour_views import BLUR_DRAW, JITTER_DRAW, NUM_DRAWS, colour_views
from dora_lightning.data.augment.compiled import compiled_blur_uint8
from dora_lightning.data.augment.crops import crop_interpolate
from dora_lightning.data.augment.multicrop import COLOUR_BACKENDS, CROP_BACKENDS, ClipMultiCrop
from dora_lightning.data.augment.multicrop_args import RECIPES

SIGMA_DRAW = NUM_DRAWS - 1  # the last column of the per-image uniforms: the blur sigma
NO_COLOUR = dict(jitter_prob=0.0, grayscale_prob=0.0, global_blur_prob=0.0, local_blur_prob=0.0)
SMALL = dict(global_size=24, local_size=12, pre_crop_size=40)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_frames(T: int = 3, H: int = 48, W: int = 64, C: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (T, H, W, C), dtype=torch.uint8, generator=gen(seed))


def replay_draws(t: ClipMultiCrop, T: int, H: int, W: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-image uniforms of the global views and the solarise/local-flip uniforms of a call with ``seed``,
    drawn in the order ClipMultiCrop draws them."""
    g = gen(seed)
    t.sample_boxes(T, H, W, g)
    torch.randperm(4, generator=g)
    u_global = torch.rand(t.num_global_crops * T, NUM_DRAWS, generator=g)
    torch.rand(t.num_local_crops * T, NUM_DRAWS, generator=g)
    return u_global, torch.rand((t.num_global_crops + t.num_local_crops) * T, generator=g)


def pre_recipe_views(t: ClipMultiCrop, frames: torch.Tensor, g: torch.Generator) -> list[torch.Tensor]:
    """The default backends' ``ClipMultiCrop.__call__`` as it was before recipes existed (DoRA's augmentation: global
    blur 0.1, local blur 0.5, no solarisation, no local flip, these draws in this order), from the same parts."""
    T, H, W, C = frames.shape
    G, L = t.num_global_crops, t.num_local_crops
    boxes = t.sample_boxes(T, H, W, g)
    order = torch.randperm(4, generator=g).tolist()
    u_global = torch.rand(G * T, NUM_DRAWS, generator=g)
    u_local = torch.rand(L * T, NUM_DRAWS, generator=g)
    jittered, blurred = u_local[:, JITTER_DRAW] < 0.8, u_local[:, BLUR_DRAW] < 0.5
    order_local = torch.sort(torch.where(jittered, blurred.long(), 3 - blurred.long()), stable=True).indices
    lboxes = boxes.to_frame(boxes.local_boxes).view(L * T, 4)[order_local]
    lframes = torch.arange(T).repeat(L)[order_local]
    no_flip = torch.zeros(L * T, dtype=torch.bool)
    gboxes = boxes.to_frame(boxes.global_boxes)
    packed = C == 4
    crops = crop_interpolate(
        frames,
        gboxes,
        boxes.global_flip,
        lboxes,
        lframes,
        no_flip,
        torch.uint8,
        packed,
        t.global_size,
        t.local_size,
    )
    global_out = colour_views(crops[0], 255.0, u_global, order, 0.1, t.colour, packed)
    local_out = colour_views(crops[1], 255.0, u_local[order_local], order, 0.5, t.colour, packed)
    local_out = local_out[torch.argsort(order_local)]
    return [*global_out.view(G, T, *global_out.shape[1:]), *local_out.view(L, T, *local_out.shape[1:])]


@pytest.mark.parametrize("kwargs", [{}, {"num_global_crops": 2}, {"output_dtype": "float32"}])
@pytest.mark.parametrize("channels", [3, 4])
def test_default_views_are_the_pre_recipe_views(kwargs, channels):
    """The defaults (recipe "dora") give, bit for bit, the views of the code before recipes (docs/benchmarks.md's
    demo table and the parity tests depend on it): fails if a default or the order of the draws changes."""
    t = ClipMultiCrop(num_local_crops=3, **SMALL, **kwargs)
    assert (t.recipe, t.global_solarize_prob, t.local_flip_prob) == ("dora", (0.0,) * t.num_global_crops, 0.0)
    for seed, clip in [(0, 0), (1, 0), (2, 1), (3, 2)]:
        frames = random_frames(T=3 + clip, H=50, W=70, C=channels, seed=clip)
        out = t(frames, gen(seed))
        for got, want in zip(
            out["global_views"] + out["local_views"], pre_recipe_views(t, frames, gen(seed)), strict=True
        ):
            assert got.dtype == want.dtype and torch.equal(got, want), (seed, clip)


def test_recipes_and_precedence():
    assert (ClipMultiCrop().global_blur_prob, ClipMultiCrop(num_global_crops=3).global_blur_prob) == (
        (0.1,),
        (0.1, 0.1, 0.1),
    )
    dino = ClipMultiCrop(num_global_crops=2, recipe="dino")
    assert dino.global_blur_prob == (1.0, 0.1) and dino.global_solarize_prob == (0.0, 0.2)
    assert dino.local_flip_prob == 0.5 and dino.local_blur_prob == 0.5 and dino.jitter_prob == 0.8
    # explicit arguments win over the recipe's values; a float applies to every global view
    mixed = ClipMultiCrop(num_global_crops=2, recipe="dino", global_blur_prob=0.3, local_flip_prob=0.0)
    assert (mixed.global_blur_prob, mixed.global_solarize_prob, mixed.local_flip_prob) == (
        (0.3, 0.3),
        (0.0, 0.2),
        0.0,
    )
    dora = ClipMultiCrop(num_global_crops=2, global_solarize_prob=[0.0, 0.2], local_flip_prob=0.5)
    assert dora.global_blur_prob == (0.1, 0.1) and dora.global_solarize_prob == (0.0, 0.2)
    assert set(RECIPES["dora"]) == set(RECIPES["dino"])
    assert "recipe='dino'" in repr(dino) and "global_solarize_prob=(0.0, 0.2)" in repr(dino)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_global_crops": 2, "global_blur_prob": [0.1, 0.2, 0.3]}, "global_blur_prob has 3 values"),
        ({"num_global_crops": 2, "global_solarize_prob": [0.2]}, "global_solarize_prob has 1 values"),
        ({"recipe": "dino"}, "global_blur_prob has 2 values but num_global_crops is 1"),
        ({"num_global_crops": 2, "global_blur_prob": [0.1, 1.5]}, r"global_blur_prob\[1\]"),
        ({"global_solarize_prob": -0.2}, "global_solarize_prob"),
        ({"local_flip_prob": 1.5}, "local_flip_prob"),
        ({"recipe": "simclr"}, "recipe must be one of"),
    ],
)
def test_per_view_arguments_are_checked(kwargs, match):
    with pytest.raises(ValueError, match=match) as err:
        ClipMultiCrop(**kwargs)
    assert "\n" not in str(err.value)


def test_recipe_in_jsonargparse():
    jsonargparse = pytest.importorskip("jsonargparse")
    parser = jsonargparse.ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(ClipMultiCrop, "aug")
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes
    args = ["--aug.num_global_crops=2", "--aug.recipe=dino", "--aug.global_solarize_prob=[0.0, 0.5]"]
    t = instantiate(parser.parse_args(args)).aug
    assert (t.global_blur_prob, t.global_solarize_prob, t.local_flip_prob) == ((1.0, 0.1), (0.0, 0.5), 0.5)
    t = instantiate(parser.parse_args(["--aug.global_blur_prob=0.4"])).aug
    assert (t.recipe, t.global_blur_prob) == ("dora", (0.4,))
    with pytest.raises(jsonargparse.ArgumentError):
        parser.parse_args(["--aug.recipe=simclr"])


def test_first_global_view_is_always_blurred():
    """DINO's first global view (p = 1): exactly the same draw unblurred, then blurred with the drawn sigma, in every
    frame; the other views are unchanged by it."""
    T, H, W = 4, 48, 64
    frames = random_frames(T, H, W)
    kwargs = dict(num_global_crops=2, num_local_crops=2, recipe="dino", global_solarize_prob=0.0, **SMALL)
    kwargs.update(jitter_prob=0.0, grayscale_prob=0.0)  # the colour map is then the identity
    blurred, plain = ClipMultiCrop(**kwargs), ClipMultiCrop(**kwargs, global_blur_prob=[0.0, 0.1])
    for seed in range(4):
        a, b = blurred(frames, gen(seed)), plain(frames, gen(seed))
        assert torch.equal(a["global_views"][1], b["global_views"][1])
        assert all(torch.equal(x, y) for x, y in zip(a["local_views"], b["local_views"], strict=True))
        u_global, _ = replay_draws(blurred, T, H, W, seed)
        lo, hi = blurred.blur_sigma
        sigma = lo + (hi - lo) * u_global[:T, SIGMA_DRAW]
        assert torch.equal(a["global_views"][0], compiled_blur_uint8(b["global_views"][0], sigma, hi))
        assert all(not torch.equal(a["global_views"][0][f], b["global_views"][0][f]) for f in range(T))


def test_second_global_view_is_solarised_one_time_in_five():
    """DINO's recipe solarises the second global view's images with p = 0.2, each frame with its own draw, and never
    the first: on a flat level-200 clip (no jitter: blur keeps it flat) a solarised image is flat 55."""
    T = 4
    t = ClipMultiCrop(8, 4, 2, 0, pre_crop_size=None, recipe="dino", jitter_prob=0.0, grayscale_prob=0.0)
    frames = torch.full((T, 16, 16, 3), 200, dtype=torch.uint8)
    counts, mixed_clips = torch.zeros(2), 0
    for seed in range(300):
        views = torch.stack(t(frames, gen(seed))["global_views"])  # (2, T, 3, 8, 8)
        levels = views.flatten(2)
        assert bool(((levels == 200) | (levels == 55)).all())
        flat = levels[..., 0]
        assert torch.equal(
            flat == 55,
            (replay_draws(t, T, 16, 16, seed)[1][: 2 * T] < 0.2).view(2, T)
            & (torch.arange(2) == 1).view(2, 1),
        )
        counts += (flat == 55).sum(1)
        mixed_clips += int(0 < int((flat[1] == 55).sum()) < T)
    assert counts[0] == 0 and abs(float(counts[1]) / (300 * T) - 0.2) < 0.04, counts
    assert mixed_clips > 30  # per-frame draws, not per-view


@pytest.mark.parametrize("backend", CROP_BACKENDS)
def test_local_flip_is_per_view_and_frame(backend):
    T, H, W = 4, 48, 64
    frames = random_frames(T, H, W, seed=2)
    kwargs = dict(
        num_local_crops=3, crop_backend=backend, output_dtype="float32", colour_backend="fused", **SMALL
    )
    plain = ClipMultiCrop(**kwargs, **NO_COLOUR)
    half = ClipMultiCrop(**kwargs, **{**NO_COLOUR, "local_flip_prob": 0.5})
    mixed_views = 0
    for seed in range(4):
        a, b = plain(frames, gen(seed)), half(frames, gen(seed))
        flips = (replay_draws(half, T, H, W, seed)[1][T:] < 0.5).view(3, T)
        assert torch.equal(a["global_views"][0], b["global_views"][0])
        for v, (x, y) in enumerate(zip(a["local_views"], b["local_views"], strict=True)):
            for f in range(T):
                assert torch.equal(y[f], x[f].flip(-1) if flips[v, f] else x[f]), (seed, v, f)
            mixed_views += int(0 < int(flips[v].sum()) < T)
    assert mixed_views > 0
    every = ClipMultiCrop(**kwargs, **{**NO_COLOUR, "local_flip_prob": 1.0})(frames, gen(0))
    for x, y in zip(plain(frames, gen(0))["local_views"], every["local_views"], strict=True):
        assert torch.equal(y, x.flip(-1))


DINO_ALL_ON = dict(
    num_global_crops=2, num_local_crops=3, recipe="dino", global_solarize_prob=[0.5, 1.0], **SMALL
)


@pytest.mark.parametrize("crop_backend", CROP_BACKENDS)
def test_backends_agree_with_the_dino_recipe(crop_backend):
    """Compiled vs fused: at most two levels apart, as without solarisation and flips (solarisation maps levels
    near its threshold 128 to near 127, so it keeps the rounding differences small)."""
    frames = random_frames(T=3, H=60, W=80)
    kwargs = dict(DINO_ALL_ON, crop_backend=crop_backend)
    compiled = ClipMultiCrop(**kwargs, colour_backend="compiled")(frames, gen(4))
    fused = ClipMultiCrop(**kwargs, colour_backend="fused")(frames, gen(4))
    exact = ClipMultiCrop(**kwargs, colour_backend="exact")(frames, gen(4))
    for key in compiled:
        for a, b, c in zip(compiled[key], fused[key], exact[key], strict=True):
            diff = (a.int() - b.int()).abs()
            assert diff.max() <= 2 and diff.float().mean() < 0.3, (key, diff.max(), diff.float().mean())
            assert (b.int() - c.int()).abs().float().mean() < 8  # YIQ vs HSV hue: same views, other colours


@pytest.mark.parametrize("colour_backend", COLOUR_BACKENDS)
def test_uint8_output_is_the_float_output_quantised_with_the_dino_recipe(colour_backend):
    frames = random_frames(T=3, H=48, W=64)
    kwargs = dict(DINO_ALL_ON, colour_backend=colour_backend)
    small = ClipMultiCrop(**kwargs)(frames, gen(3))
    full = ClipMultiCrop(**kwargs, output_dtype="float32")(frames, gen(3))
    normalise = ClipMultiCrop(**kwargs).normalize
    for key in small:
        for a, b in zip(small[key], full[key], strict=True):
            torch.testing.assert_close(normalise(a), b, rtol=0, atol=0.5 / 255 / 0.224 + 1e-5)


@pytest.mark.parametrize("kwargs", [{}, {"crop_backend": "roi_align"}, {"colour_backend": "fused"}])
def test_rgba_frames_and_frame_lists_give_the_same_dino_views(kwargs):
    """The packed RGBA path (default backends) solarises and flips as the planar path does, bit for bit."""
    t = ClipMultiCrop(**DINO_ALL_ON, **kwargs)
    rgba = random_frames(T=3, H=36, W=52, C=4, seed=7)
    for seed in range(3):
        want = t(rgba[..., :3].contiguous(), gen(seed))
        for got in (t(rgba, gen(seed)), t(list(rgba.unbind(0)), gen(seed))):
            for key in want:
                assert all(torch.equal(a, b) for a, b in zip(want[key], got[key], strict=True)), (key, seed)
