"""Tests for dora_lightning.data.augment.colour_ops (grayscale, HSV, colour jitter and solarisation on groups of images)."""

from __future__ import annotations

import colorsys
import math

import numpy as np
import torch
from torchvision.transforms.v2 import functional as TF

from dora_lightning.data.augment.colour_ops import (
    adjust_brightness_,
    adjust_contrast_,
    adjust_hue_,
    adjust_saturation_,
    apply_colour_affine,
    colour_affine,
    colour_map_uint8,
    colour_matrix,
    hsv_to_rgb,
    rgb_to_grayscale,
    rgb_to_hsv,
    solarize,
)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


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


# -- fused colour jitter ---------------------------------------------------------------------------------------


def _fused(img: torch.Tensor, b=1.0, c=1.0, s=1.0, h=0.0, grey=False) -> torch.Tensor:
    n = img.shape[0]
    full = lambda v: torch.full((n,), float(v))  # noqa: E731
    matrix, bias = colour_affine(
        full(b), full(c), full(s), full(h), torch.full((n,), grey), img.mean(dim=(-2, -1))
    )
    return apply_colour_affine(img, matrix, bias, 1.0)


def test_fused_identity_and_single_ops_equal_the_exact_ops():
    """Away from clamping, each fused op is exactly the corresponding exact op."""
    img = 0.25 + 0.5 * torch.rand(4, 3, 9, 9, generator=gen(1))  # in [0.25, 0.75]: factors near 1 never clamp
    torch.testing.assert_close(_fused(img), img, rtol=0, atol=1e-6)
    for kwargs, exact in [
        ({"b": 1.2}, lambda x: adjust_brightness_(x, torch.full((4,), 1.2))),
        ({"c": 0.7}, lambda x: adjust_contrast_(x, torch.full((4,), 0.7))),
        ({"s": 1.3}, lambda x: adjust_saturation_(x, torch.full((4,), 1.3))),
        ({"grey": True}, lambda x: rgb_to_grayscale(x).expand_as(x)),
    ]:
        torch.testing.assert_close(_fused(img, **kwargs), exact(img.clone()), rtol=0, atol=1e-5)


def test_fused_hue_turns_colours_like_the_hsv_shift():
    """The YIQ rotation approximates the HSV hue shift: the HSV hue of coloured pixels turns by about ``shift``,
    in the same direction, while luma is kept except where a channel clamps (the HSV shift keeps the value)."""
    img = 0.2 + 0.6 * torch.rand(8, 3, 6, 6, generator=gen(2))
    coloured = rgb_to_hsv(img)[:, 1] > 0.3
    for shift in (0.1, -0.1, 0.05):
        fused = _fused(img, h=shift)
        turned = (rgb_to_hsv(fused)[:, 0] - rgb_to_hsv(img)[:, 0] + 0.5).remainder(1.0) - 0.5
        turned = turned[coloured]
        assert (turned.sign() == math.copysign(1, shift)).float().mean() > 0.9, shift
        assert abs(turned.median() - shift) < 0.3 * abs(shift), (shift, turned.median())
        luma_change = rgb_to_grayscale(fused) - rgb_to_grayscale(img)  # 0 but where a channel clamps
        assert (luma_change.abs() < 1e-5).float().mean() > 0.9 and luma_change.abs().mean() < 2e-3
    grey = torch.full((1, 3, 4, 4), 0.4)
    torch.testing.assert_close(_fused(grey, h=0.3), grey, rtol=0, atol=1e-6)  # grey has no hue to turn


def test_fused_ops_commute_and_compose():
    """Jitter then grayscale equals the product of the maps; the order of the four jitter ops does not matter."""
    img = 0.3 + 0.4 * torch.rand(3, 3, 8, 8, generator=gen(3))
    b, c, s, h = 1.1, 0.8, 1.2, 0.07
    fused = _fused(img, b, c, s, h)
    step = img.clone()
    for op in (
        lambda x: _fused(x, h=h),
        lambda x: _fused(x, s=s),
        lambda x: _fused(x, c=c),
        lambda x: _fused(x, b=b),
    ):
        step = op(step)
    torch.testing.assert_close(fused, step, rtol=0, atol=1e-5)
    torch.testing.assert_close(
        _fused(img, b, c, s, h, grey=True), rgb_to_grayscale(fused).expand_as(img), atol=1e-5, rtol=0
    )


def test_fused_clamps_and_scales():
    img = torch.rand(2, 3, 5, 5, generator=gen(4))
    bright = _fused(img, b=3.0)
    assert bright.max() <= 1.0 and bright.min() >= 0.0 and (bright == 1.0).any()
    n = 2
    matrix, bias = colour_affine(
        torch.full((n,), 1.3),
        torch.full((n,), 0.8),
        torch.ones(n),
        torch.zeros(n),
        torch.zeros(n, dtype=torch.bool),
        (img * 255).mean(dim=(-2, -1)),
    )
    scaled = apply_colour_affine(img * 255, matrix, bias, 255.0)
    torch.testing.assert_close(scaled / 255, _fused(img, b=1.3, c=0.8), rtol=0, atol=1e-5)


def test_colour_matrix_offset_is_colour_affines_bias():
    n = 5
    u = torch.rand(n, 4, generator=gen(5))
    factors = (0.6 + 0.8 * u[:, 0], 0.6 + 0.8 * u[:, 1], 0.8 + 0.4 * u[:, 2], 0.2 * u[:, 3] - 0.1)
    grey = torch.tensor([False, True, False, True, False])
    channel_mean = 255 * torch.rand(n, 3, generator=gen(6))
    matrix, mean_coef = colour_matrix(*factors, grey)
    matrix2, bias = colour_affine(*factors, grey, channel_mean)
    torch.testing.assert_close(matrix, matrix2)
    expected = mean_coef.double() * (
        channel_mean.double() @ torch.tensor([0.299, 0.587, 0.114], dtype=torch.float64)
    )
    torch.testing.assert_close(bias, expected.float().view(n, 1).expand(n, 3), rtol=1e-6, atol=1e-4)


def test_colour_map_uint8_is_the_float_map_rounded():
    """The uint8 colour map = the float affine map of the same images, clamped to [0, 255] and rounded half up."""
    n = 6
    views = torch.randint(0, 256, (n, 3, 11, 13), dtype=torch.uint8, generator=gen(7))
    u = torch.rand(n, 4, generator=gen(8))
    factors = (0.3 + 1.4 * u[:, 0], 0.3 + 1.4 * u[:, 1], 0.5 + u[:, 2], 0.4 * u[:, 3] - 0.2)  # strong: clamps
    grey = torch.tensor([False, True, False, False, True, False])
    matrix, mean_coef = colour_matrix(*factors, grey)
    out = colour_map_uint8(views, matrix, mean_coef)
    assert out.dtype == torch.uint8 and out.shape == views.shape
    x = views.float()
    m, b = colour_affine(*factors, grey, x.mean(dim=(-2, -1)))
    expected = apply_colour_affine(x, m, b, 255.0)
    assert (out.float() - expected).abs().max() <= 0.5 + 1e-3
    assert (out == 0).any() and (out == 255).any()  # the strong factors did clamp
    identity, zero = colour_matrix(
        torch.ones(n), torch.ones(n), torch.ones(n), torch.zeros(n), torch.zeros(n, dtype=torch.bool)
    )
    assert torch.equal(colour_map_uint8(views, identity, zero), views)


def test_solarize_known_pixels_and_pil():
    """DINO's solarisation (PIL ImageOps.solarize, threshold 128): 8-bit levels >= 128 become 255 - level."""
    from PIL import Image, ImageOps

    levels = torch.tensor([0, 1, 100, 127, 128, 129, 200, 254, 255], dtype=torch.uint8)
    expected = torch.tensor([0, 1, 100, 127, 127, 126, 55, 1, 0], dtype=torch.uint8)
    assert torch.equal(solarize(levels.view(1, 1, 1, -1)).view(-1), expected)
    pixels = torch.randint(0, 256, (2, 3, 9, 11), dtype=torch.uint8, generator=gen(4))
    for image in pixels:
        pil = ImageOps.solarize(Image.fromarray(image.permute(1, 2, 0).numpy()), threshold=128)
        assert torch.equal(solarize(image), torch.from_numpy(np.array(pil)).permute(2, 0, 1))
    assert torch.equal(solarize(pixels), TF.solarize(pixels, threshold=128))
    # float images in [0, high]: solarised then rounded = rounded then solarised (threshold at level 127.5; only
    # exact half levels, where rounding half up is not symmetric, may differ by one)
    floats = torch.rand(4, 3, 16, 16, generator=gen(5)) * 255.0
    floats[0, 0, 0, :4] = torch.tensor([127.49, 127.51, 128.0, 255.0])
    rounded = (floats + 0.5).to(torch.uint8)
    assert torch.equal((solarize(floats) + 0.5).to(torch.uint8), solarize(rounded))
    torch.testing.assert_close(solarize(floats / 255.0, high=1.0), solarize(floats) / 255.0)
    torch.testing.assert_close(solarize(torch.tensor([0.2, 0.6]), high=1.0), torch.tensor([0.2, 0.4]))
