"""A ViT MLP that keeps one hidden activation per block instead of two, for a smaller training footprint.

timm's ``Mlp`` (fc1 -> GELU -> fc2) lets autograd save both the GELU input and the GELU output, each 4x the token width:
about half of a ViT's activation memory. ``LeanMlp`` computes GELU and fc2 in one autograd function that saves only the
GELU input and recomputes the (cheap, elementwise) GELU in the backward pass. Same parameters and state-dict keys
(``mlp.fc1.*``, ``mlp.fc2.*``), same results.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from torch import Tensor, nn


class _GeluLinear(torch.autograd.Function):
    """y = linear(gelu(h), weight, bias), saving h (not gelu(h)) for the backward pass."""

    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:  # type: ignore[override]
        device = h.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else h.dtype
        ctx.save_for_backward(h, weight)
        ctx.compute_dtype, ctx.has_bias = dtype, bias is not None
        with torch.autocast(device, enabled=False):
            return F.linear(F.gelu(h).to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:  # type: ignore[override]
        h, weight = ctx.saved_tensors
        dtype = ctx.compute_dtype
        with torch.autocast(h.device.type, enabled=False):
            activation = F.gelu(h).to(dtype)
            grad_out = grad_out.to(dtype)
            grad_activation = grad_out @ weight.to(dtype)
            flat_grad = grad_out.reshape(-1, grad_out.shape[-1])
            grad_weight = (flat_grad.t() @ activation.reshape(-1, activation.shape[-1])).to(weight.dtype)
            grad_bias = flat_grad.sum(0).to(weight.dtype) if ctx.has_bias else None
            grad_h = torch.ops.aten.gelu_backward(grad_activation.to(h.dtype), h)
        return grad_h, grad_weight, grad_bias


class LeanMlp(nn.Module):
    """fc1 -> GELU -> fc2 with one saved hidden activation (see the module docstring)."""

    def __init__(self, fc1: nn.Linear, fc2: nn.Linear) -> None:
        super().__init__()
        self.fc1, self.fc2 = fc1, fc2

    def forward(self, x: Tensor) -> Tensor:
        return _GeluLinear.apply(self.fc1(x), self.fc2.weight, self.fc2.bias)


def _is_plain_gelu_mlp(mlp: nn.Module) -> bool:
    if type(mlp) is not Mlp or not isinstance(mlp.act, nn.GELU) or mlp.act.approximate != "none":
        return False
    no_op = (nn.Identity, nn.Dropout)
    drops_off = all(isinstance(m, no_op) and getattr(m, "p", 0.0) == 0.0 for m in (mlp.drop1, mlp.drop2))
    return drops_off and isinstance(mlp.norm, nn.Identity) and isinstance(mlp.fc1, nn.Linear)


def use_lean_mlps_(model: nn.Module) -> int:
    """Swap every plain GELU ``Mlp`` of ``model.blocks`` for a ``LeanMlp`` in place; returns how many were swapped."""
    swapped = 0
    for block in getattr(model, "blocks", []):
        if _is_plain_gelu_mlp(block.mlp):
            block.mlp = LeanMlp(block.mlp.fc1, block.mlp.fc2)
            swapped += 1
    return swapped
