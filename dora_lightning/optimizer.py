"""The student's optimiser: AdamW with DINO's parameter groups, fused on CUDA where that is safe."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["student_adamw", "use_fused_adamw"]


def student_adamw(student: nn.Module, grad_scaler: bool) -> torch.optim.AdamW:
    """AdamW over ``student``'s trainable parameters: weight decay on weights, none on biases and norms (DINO's
    groups; the lr and the decay are set every step from the schedules, so both start at 0 here). Fused when
    :func:`use_fused_adamw` allows it; ``grad_scaler``: the run's precision scales the loss (``16-mixed``)."""
    decay, no_decay = [], []
    for name, param in student.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 or name.endswith(".bias") else decay).append(param)
    fused = {"fused": True} if use_fused_adamw(decay + no_decay, grad_scaler) else {}
    return torch.optim.AdamW([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}], lr=0.0, **fused)


def use_fused_adamw(parameters: Sequence[torch.Tensor], grad_scaler: bool) -> bool:
    """The fused implementation (one kernel for all parameters) when every parameter is on CUDA and no gradient
    scaler is at work. A fused AdamW unscales the gradients inside its own step, so Lightning leaves them scaled
    before the clip (``amp.py``: only optimisers that do not unscale themselves are unscaled first): DINO's
    per-parameter clip to norm 3 would then clip gradients 65,536 times too large, renormalising nearly every
    tensor every step. Under ``16-mixed`` the foreach AdamW runs instead, and Lightning unscales before the clip."""
    return bool(parameters) and all(p.is_cuda for p in parameters) and not grad_scaler
