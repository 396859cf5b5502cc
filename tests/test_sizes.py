"""One short-side resize rule (dora_lightning/sizes.py) gives exactly the sizes of the three formulas it replaced."""

from __future__ import annotations

import itertools

import pytest

from dora_lightning.sizes import short_side_size
from evaluators.segmentation.data import eval_size

SIDES = range(17, 900, 23)
SHORTS = (16, 32, 64, 112, 160, 224, 240, 320, 480, 512)


def decoder_before(width: int, height: int, short: int) -> tuple[int, int]:
    if short >= min(width, height):
        return width, height
    scale = short / min(width, height)
    return max(2, round(width * scale / 2) * 2), max(2, round(height * scale / 2) * 2)


def visualize_before(width: int, height: int, short: int) -> tuple[int, int]:
    scale = short / min(width, height)
    return max(short, round(width * scale)), max(short, round(height * scale))


def segmentation_before(height: int, width: int, short: int, patch: int) -> tuple[int, int]:
    scale = short / min(height, width)
    rounded = [max(patch, round(side * scale / patch) * patch) for side in (height, width)]
    rounded[0 if height <= width else 1] = short
    return rounded[0], rounded[1]


def test_the_decoder_visualize_and_segmentation_sizes_are_unchanged() -> None:
    for width, height, short in itertools.product(SIDES, SIDES, SHORTS):
        assert short_side_size(width, height, short, multiple=2, upscale=False) == decoder_before(
            width, height, short
        )
        assert short_side_size(width, height, short) == visualize_before(width, height, short)
        for patch in (8, 14, 16):
            assert eval_size(height, width, short, patch) == segmentation_before(height, width, short, patch)


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="short_side and multiple"):
        short_side_size(640, 480, 0)
