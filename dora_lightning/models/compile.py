"""``model.compile: true``: compile the transformer blocks and heads with ``torch.compile``, region by region.

Each block is compiled in place (``nn.Module.compile``), so parameter names, checkpoints, the EMA and exported
backbones are unchanged, and all blocks share one compiled graph (they have the same code and shapes). The teacher's
last block is left eager: the tracker reads its attention projection through a forward hook.
"""

from __future__ import annotations

from torch import nn


def compile_regions_(student: nn.Module, teacher: nn.Module) -> int:
    """Compile the blocks and head of ``student`` and ``teacher`` (``StudentTeacher``: ``.backbone.blocks``,
    ``.head``), except the teacher's last block; returns the number of modules compiled. Calling it again is a
    no-op for modules already compiled."""
    regions = [*student.backbone.blocks, student.head, *teacher.backbone.blocks[:-1], teacher.head]
    compiled = 0
    for module in regions:
        if getattr(module, "_compiled_call_impl", None) is None:
            module.compile()
            compiled += 1
    return compiled
