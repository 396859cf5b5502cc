"""Exponential moving average teacher update (spec A.6)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

__all__ = ["copy_params_", "ema_update_"]


@torch.no_grad()
def ema_update_(teacher_params: Iterable[Tensor], student_params: Iterable[Tensor], momentum: float) -> None:
    """In place ``t <- momentum * t + (1 - momentum) * s`` for paired parameter lists (multi-tensor foreach ops)."""
    teacher = [p.detach() for p in teacher_params]
    student = [p.detach() for p in student_params]
    if len(teacher) != len(student):
        raise ValueError(f"teacher has {len(teacher)} tensors but student has {len(student)}")
    for i, (t, s) in enumerate(zip(teacher, student, strict=True)):
        if t.shape != s.shape:
            raise ValueError(f"tensor {i}: teacher shape {tuple(t.shape)} != student shape {tuple(s.shape)}")
    if not teacher:
        return
    if momentum == 1.0:
        return
    torch._foreach_mul_(teacher, momentum)
    torch._foreach_add_(teacher, student, alpha=1.0 - momentum)


@torch.no_grad()
def copy_params_(teacher: nn.Module, student: nn.Module) -> None:
    """Copy every parameter and buffer of ``student`` into ``teacher`` in place (names must match)."""
    for kind, t_items, s_items in (
        ("parameter", teacher.named_parameters(), student.named_parameters()),
        ("buffer", teacher.named_buffers(), student.named_buffers()),
    ):
        t_dict, s_dict = dict(t_items), dict(s_items)
        if t_dict.keys() != s_dict.keys():
            missing = sorted(set(s_dict) ^ set(t_dict))
            raise ValueError(f"teacher and student {kind} names differ: {missing[:5]}")
        for name, t in t_dict.items():
            t.copy_(s_dict[name])
