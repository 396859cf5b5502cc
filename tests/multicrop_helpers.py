"""Shared helpers of the clip multi-crop tests (tests/test_transforms*.py, tests/test_crop_boxes.py): seeded
generators, random and smooth test frames, ImageNet normalisation undone, and ClipMultiCrop options with the colour
ops off."""

from __future__ import annotations

import torch

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
