"""The DAVIS / Pascal VOC label palette: palette ('P') PNGs are how both data sets store masks (label i has colour i
of the palette). Shared by the DAVIS evaluator, which reads such masks, and the synthetic fixtures, which write them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def davis_palette() -> list[int]:
    """The 256-colour DAVIS / Pascal VOC palette as a flat ``[r0, g0, b0, r1, ...]`` list (index 0 black).

    Colour i spreads the bits of i over the high bits of r, g and b (the VOC colour map DAVIS annotations use).
    """
    palette: list[int] = []
    for index in range(256):
        r = g = b = 0
        value = index
        for shift in range(7, -1, -1):
            r |= (value & 1) << shift
            g |= ((value >> 1) & 1) << shift
            b |= ((value >> 2) & 1) << shift
            value >>= 3
        palette += [r, g, b]
    return palette


def write_palette_png(labels: np.ndarray, path: str | Path) -> None:
    """Write (H, W) uint8 labels as a palette ('P') PNG with the DAVIS palette."""
    image = Image.fromarray(np.asarray(labels, dtype=np.uint8), mode="P")
    image.putpalette(davis_palette())
    image.save(path)
