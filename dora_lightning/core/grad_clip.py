"""DINO's per-parameter gradient clipping."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["per_parameter_clip_"]


def per_parameter_clip_(parameters: list[nn.Parameter], max_norm: float) -> None:
    """DINO's gradient clipping: scale each parameter's gradient so its own L2 norm is at most ``max_norm``."""
    for param in parameters:
        if param.grad is not None:
            norm = param.grad.detach().norm(2)
            param.grad.mul_(torch.clamp(max_norm / (norm + 1e-6), max=1.0))
