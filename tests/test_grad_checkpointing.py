"""model.grad_checkpointing: the student's blocks are recomputed in the backward pass, with the same gradients (drop
path included) and fewer activations kept for it."""

from __future__ import annotations

import torch
from test_ddp import make_batch
from test_module import MICRO

from dora_lightning.module import DoRAModule


def gradients_and_saved_bytes(module: DoRAModule, batch: dict) -> tuple[list[torch.Tensor], int]:
    """One loss's student gradients, and the bytes autograd kept for the backward pass."""
    saved = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        saved += tensor.numel() * tensor.element_size()
        return tensor

    module.train()
    torch.manual_seed(1)  # the same drop-path masks
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        parts, _, _ = module.compute_loss(batch, teacher_temp=0.04)
    parts.total.backward()
    return [p.grad.clone() for p in module.student.parameters() if p.grad is not None], saved


def test_checkpointed_student_gives_the_same_gradients_keeping_fewer_activations():
    options = MICRO | {"drop_path_rate": 0.2, "depth": 3}
    torch.manual_seed(0)
    plain = DoRAModule(**options)
    checkpointed = DoRAModule(**options, grad_checkpointing=True)
    checkpointed.load_state_dict(plain.state_dict())
    assert (
        checkpointed.student.backbone.grad_checkpointing
        and not checkpointed.teacher.backbone.grad_checkpointing
    )
    batch = make_batch()
    expected, kept = gradients_and_saved_bytes(plain, batch)
    got, kept_checkpointed = gradients_and_saved_bytes(checkpointed, batch)
    assert len(got) == len(expected) > 0
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert kept_checkpointed < 0.6 * kept, (kept_checkpointed, kept)
