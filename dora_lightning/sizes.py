"""Resizing an image or frame so that its short side is N pixels: the one rule the data and the probes use."""

from __future__ import annotations

__all__ = ["short_side_size"]


def short_side_size(
    width: int, height: int, short_side: int, multiple: int = 1, upscale: bool = True
) -> tuple[int, int]:
    """(width, height) scaled by ``short_side / min(width, height)``, each side rounded to the nearest multiple of
    ``multiple`` (at least one multiple). With ``upscale=False`` a frame already no larger keeps its size.

    The video decoder uses ``multiple=2, upscale=False`` (even sizes, never upscaled), ``dora visualize``
    ``multiple=1``, the segmentation probe the patch size (its short side is a multiple of it already). DAVIS keeps
    DINO's own rule (both sides floored to the patch size: ``evaluators.davis.data.model_size``), so that its
    numbers compare with the published ones.
    """
    if short_side < 1 or multiple < 1:
        raise ValueError(f"short_side and multiple must be >= 1, got {short_side} and {multiple}")
    if not upscale and short_side >= min(width, height):
        return width, height
    scale = short_side / min(width, height)
    new_width, new_height = (
        max(multiple, round(side * scale / multiple) * multiple) for side in (width, height)
    )
    return new_width, new_height
