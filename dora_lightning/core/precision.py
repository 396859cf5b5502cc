"""Where mixed precision must not reach: a context that keeps float32 arithmetic float32 under any active autocast.

Under ``--trainer.precision bf16-mixed`` / ``16-mixed`` Lightning runs every step inside ``torch.autocast``, which
rounds the inputs of matmuls (and einsums) to bf16/fp16. The parts whose arithmetic must stay exact enough (the
Sinkhorn-Knopp and tracker math, the evaluators' k-NN vote and label propagation) enter :func:`fp32_region` on the
device of their tensors.
"""

from __future__ import annotations

import contextlib

import torch

__all__ = ["fp32_region"]


def fp32_region(device: torch.device) -> contextlib.AbstractContextManager:
    """Context that disables autocast on ``device`` so matmuls/softmax of fp32 tensors stay fp32 (bf16-safe)."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()
