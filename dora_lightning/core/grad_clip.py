"""DINO's per-parameter gradient clipping."""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import Tensor, nn

__all__ = ["per_parameter_clip_"]


def per_parameter_clip_(parameters: list[nn.Parameter], max_norm: float) -> None:
    """DINO's gradient clipping: scale each parameter's gradient so its own L2 norm is at most ``max_norm``.

    Multi-tensor (foreach) ops: 7 operator calls for the 158 parameters of a ViT-S student with its head, where the
    loop makes 948, and nothing read back to the host; the result equals the loop (``norm``, ``max_norm / (norm +
    1e-6)`` clamped to 1, multiply) element for element. On a GPU the norms run as multi-tensor kernels, but the
    multiply does not: PyTorch's multi-tensor fast path needs both lists' tensors to match in shape, and each
    gradient's scale is a 0-d tensor, so it launches one kernel per gradient (~160 small launches a step)."""
    groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = defaultdict(list)
    for param in parameters:
        if param.grad is not None:
            groups[(param.grad.device, param.grad.dtype)].append(param.grad)
    for grads in groups.values():
        norms = torch.stack(torch._foreach_norm(grads, 2))
        scales = torch.clamp(max_norm / (norms + 1e-6), max=1.0)
        torch._foreach_mul_(grads, list(scales.unbind()))
