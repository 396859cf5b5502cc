"""``model.compile: true``: compile the transformer blocks and heads with ``torch.compile``, region by region.

Each block is compiled in place (``nn.Module.compile``), so parameter names, checkpoints, the EMA and exported
backbones are unchanged. The blocks share one compiled code object (``Block.forward``), whose cache holds at most
``torch._dynamo.config.recompile_limit`` (8) graphs; the blocks beyond that would run eager. A graph depends on what
dynamo guards on: the input shapes (the second size seen makes them dynamic), grad mode, train or eval mode, and
every plain-number attribute of the module. timm's ``DropPath`` holds its probability as a float, and stochastic
depth gives every student block another one, so each block needed its own graph: a ViT-S student's 12 blocks hit the
limit, and blocks 7-11 ran uncompiled (measured on the CPU with the eager backend: 8 graphs and the limit's warning).
:class:`TensorDropPath` holds it in a tensor instead, which the graph takes as an input: one graph for all blocks of
one kind. The teacher's last block is left eager: the tracker reads its attention projection through a forward hook.
"""

from __future__ import annotations

import torch
from timm.layers import DropPath
from torch import Tensor, nn

__all__ = ["TensorDropPath", "compile_regions_"]


class TensorDropPath(nn.Module):
    """Stochastic depth as timm's ``DropPath`` (each sample's residual branch dropped with probability ``drop_prob``,
    kept ones scaled by 1 / keep probability), with the keep probability in a buffer (not saved in state dicts) so
    that compiled blocks of different rates share a graph. Its random draws differ from timm's (``torch.rand`` below
    the keep probability, not ``bernoulli_``); compiled kernels draw their own numbers anyway."""

    def __init__(self, drop_prob: float, scale_by_keep: bool = True) -> None:
        super().__init__()
        if not 0.0 <= drop_prob < 1.0:
            raise ValueError(f"drop_prob must be in [0, 1), got {drop_prob}")
        self.register_buffer("keep_prob", torch.tensor(1.0 - drop_prob), persistent=False)
        self.scale_by_keep = scale_by_keep

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return x
        keep = self.keep_prob.float()
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        mask = (torch.rand(shape, device=x.device) < keep).float()
        return x * (mask / keep if self.scale_by_keep else mask).to(x.dtype)

    def extra_repr(self) -> str:
        return f"drop_prob={1.0 - float(self.keep_prob):.3f}"


def tensor_drop_paths_(module: nn.Module) -> int:
    """Replace every timm ``DropPath`` under ``module`` by a :class:`TensorDropPath` of the same rate; returns how
    many were replaced."""
    replaced = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is DropPath:
                setattr(parent, name, TensorDropPath(child.drop_prob, child.scale_by_keep))
                replaced += 1
    return replaced


def compile_regions_(student: nn.Module, teacher: nn.Module, backend: str = "inductor") -> int:
    """Compile the blocks and head of ``student`` and ``teacher`` (``StudentTeacher``: ``.backbone.blocks``,
    ``.head``), except the teacher's last block, with ``backend``; their stochastic depth becomes
    :class:`TensorDropPath`. Returns the number of modules compiled; calling it again is a no-op for modules
    already compiled."""
    regions = [*student.backbone.blocks, student.head, *teacher.backbone.blocks[:-1], teacher.head]
    compiled = 0
    for module in regions:
        if getattr(module, "_compiled_call_impl", None) is None:
            tensor_drop_paths_(module)
            module.compile(backend=backend)
            compiled += 1
    return compiled
