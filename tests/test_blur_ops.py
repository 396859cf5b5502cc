"""Tests for dora_lightning.data.augment.blur: the convolution blur and the tap-sum blur that torch.compile fuses."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

from dora_lightning.data.augment.blur import (
    blur_columns,
    blur_radius,
    blur_rows,
    gaussian_blur,
    gaussian_kernels,
)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_gaussian_blur_matches_reference():
    x = torch.rand(4, 3, 20, 20, generator=gen())
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


def test_gaussian_blur_uint8_rounds_the_float_blur():
    x = torch.randint(0, 256, (5, 3, 16, 12), dtype=torch.uint8, generator=gen(1))
    sigma = torch.tensor([0.2, 0.7, 1.1, 1.6, 2.0])
    expected = (gaussian_blur(x.float(), sigma) + 0.5).floor()
    out = gaussian_blur(x, sigma)
    assert out.dtype == torch.uint8
    assert (out.float() - expected).abs().max() <= 1  # float summation order may flip a .5 tie
    assert (out.float() - expected).abs().mean() < 0.01
    inplace = x.clone()
    assert gaussian_blur(inplace, sigma, inplace) is inplace and torch.equal(inplace, out)


@pytest.mark.parametrize("size", [(16, 16), (9, 14), (4, 5), (2, 2)])
def test_tap_blur_equals_the_convolution_blur(size):
    """Fixed-length kernels (zero beyond each image's radius) over reflect-padded images = the convolution blur."""
    height, width = size
    x = torch.randint(0, 256, (6, 3, height, width), dtype=torch.uint8, generator=gen(2))
    sigma = torch.tensor([0.1, 0.4, 0.9, 1.2, 1.7, 2.0])
    radius = blur_radius(2.0, height, width)
    assert radius == min(6, min(size) - 1)
    kernel = gaussian_kernels(sigma, radius, width=radius)
    assert kernel.shape == (6, 2 * radius + 1)
    torch.testing.assert_close(kernel.sum(dim=1), torch.ones(6, dtype=torch.float64))
    padded = F.pad(x, (radius,) * 4, mode="reflect")
    out = blur_columns(blur_rows(padded, kernel), kernel)
    assert out.dtype == torch.uint8 and out.shape == x.shape
    assert (out.int() - gaussian_blur(x, sigma).int()).abs().max() <= 1


def test_blur_radius_rule():
    assert blur_radius(2.0, 224, 224) == 6
    assert blur_radius(0.1, 224, 224) == 1
    assert blur_radius(2.0, 4, 30) == 3
    assert blur_radius(2.0, 1, 30) == 0  # too small to blur
