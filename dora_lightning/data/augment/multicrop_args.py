"""Argument checks and augmentation recipes of :class:`~dora_lightning.data.augment.multicrop.ClipMultiCrop`.

A recipe names the per-view probabilities in which DoRA's and DINO's augmentations differ (see docs/method.md, "The
DINO baseline's augmentation"); every other argument is shared by both.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "RECIPES",
    "Recipe",
    "check_frames",
    "check_int",
    "check_pair",
    "check_per_view",
    "check_prob",
    "check_range",
    "check_triple",
    "per_image",
    "recipe_value",
]

Recipe = Literal["dora", "dino"]
# The per-view probabilities each recipe sets; an argument given explicitly (not None) overrides its recipe's value.
# A tuple has one value per global view (DINO: two global views, the first always blurred, the second sometimes
# solarised); a float applies to every global view.
RECIPES: dict[str, dict[str, float | tuple[float, ...]]] = {
    # DoRA's official code: every global view alike, no solarisation, no flip of the local views
    "dora": {"global_blur_prob": 0.1, "global_solarize_prob": 0.0, "local_flip_prob": 0.0},
    # DINO's DataAugmentationDINO (Caron et al. 2021, main_dino.py)
    "dino": {"global_blur_prob": (1.0, 0.1), "global_solarize_prob": (0.0, 0.2), "local_flip_prob": 0.5},
}


def check_int(name: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def check_prob(name: str, value: float) -> float:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {value!r}")
    return float(value)


def check_pair(name: str, value: Sequence[float]) -> tuple[float, float]:
    if len(value) != 2:
        raise ValueError(f"{name} must be a pair (lo, hi), got {value!r}")
    return float(value[0]), float(value[1])


def check_range(name: str, value: Sequence[float], upper: float | None = 1.0) -> tuple[float, float]:
    lo, hi = check_pair(name, value)
    if not (0.0 < lo <= hi and (upper is None or hi <= upper)):
        bound = "" if upper is None else f" <= {upper:g}"
        raise ValueError(f"{name} must satisfy 0 < lo <= hi{bound}, got {value!r}")
    return lo, hi


def check_triple(name: str, value: Sequence[float], positive: bool = False) -> tuple[float, float, float]:
    if len(value) != 3:
        raise ValueError(f"{name} must have 3 values (one per RGB channel), got {value!r}")
    if positive and min(value) <= 0:
        raise ValueError(f"{name} values must be > 0, got {value!r}")
    return float(value[0]), float(value[1]), float(value[2])


def recipe_value(recipe: str, name: str, value: object) -> object:
    """``value``, or ``recipe``'s value of argument ``name`` where ``value`` is None."""
    if recipe not in RECIPES:
        raise ValueError(f"recipe must be one of {tuple(RECIPES)}, got {recipe!r}")
    return RECIPES[recipe][name] if value is None else value


def check_per_view(name: str, value: float | Sequence[float], views: int) -> tuple[float, ...]:
    """One probability per global view: ``value`` repeated, or its ``views`` values checked."""
    if isinstance(value, str) or not isinstance(value, Sequence):
        return (check_prob(name, value),) * views
    if len(value) != views:
        raise ValueError(
            f"{name} has {len(value)} values but num_global_crops is {views}: give one value per view"
        )
    return tuple(check_prob(f"{name}[{i}]", v) for i, v in enumerate(value))


def per_image(probs: Sequence[float], frames: int) -> Tensor:
    """(views * frames,) float32 per-image thresholds, (view, frame) order, for comparing with float32 uniforms."""
    return torch.tensor(probs, dtype=torch.float32).repeat_interleave(frames)


def check_frames(frames: Tensor | Sequence[Tensor]) -> Tensor | list[Tensor]:
    """``frames`` as given (a tensor) or as a list, after checking they are T >= 1 non-empty uint8 frames of one
    shape with 3 or 4 channels."""
    if not isinstance(frames, Tensor):
        frames = list(frames)
        shapes = sorted({tuple(frame.shape) for frame in frames})
        dtypes = {frame.dtype for frame in frames}
        if len(shapes) > 1 or len(dtypes) > 1:
            raise ValueError(
                f"frames must all have one shape and dtype, got shapes {shapes} and dtypes {dtypes}"
            )
        if not frames:
            raise ValueError("frames must be non-empty, got an empty list")
        shape, dtype = (len(frames), *shapes[0]), frames[0].dtype
    else:
        shape, dtype = tuple(frames.shape), frames.dtype
    if len(shape) != 4 or dtype != torch.uint8 or shape[-1] not in (3, 4):
        raise ValueError(f"frames must be uint8 (T, H, W, 3) or (T, H, W, 4), got {dtype} {shape}")
    if min(shape[:3]) < 1:
        raise ValueError(f"frames must be non-empty, got shape {shape}")
    return frames
