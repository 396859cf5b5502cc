"""Per-step schedules (learning rate, weight decay, EMA momentum, teacher temperature).

Pure functions of the step index, no state, so a resumed run recomputes the same values. They follow DINO's
``cosine_scheduler`` array semantics evaluated at one index (spec B):

* warm-up is ``numpy.linspace(warmup_start, start, warmup_steps)``: ``warmup_start`` at step 0 and exactly ``start``
  at step ``warmup_steps - 1``;
* then ``end + 0.5 (start - end) (1 + cos(pi i / L))`` with ``i = step - warmup_steps`` and
  ``L = total_steps - warmup_steps``, so the last in-range step (``total_steps - 1``) is just above ``end``;
* steps at or beyond ``total_steps`` return ``end`` (DINO's array would end there).
"""

from __future__ import annotations

import math

__all__ = ["cosine_schedule", "linear_warmup_then_constant"]


def _linspace_at(step: int, num: int, start: float, end: float) -> float:
    """Element ``step`` of ``numpy.linspace(start, end, num)`` for ``0 <= step < num``."""
    if num == 1:
        return float(start)
    return float(start + (end - start) * step / (num - 1))


def cosine_schedule(
    step: int,
    total_steps: int,
    start: float,
    end: float,
    warmup_steps: int = 0,
    warmup_start: float = 0.0,
) -> float:
    """Value at ``step`` of a linear warm-up (``warmup_start`` -> ``start``) followed by a cosine from ``start`` to ``end``.

    Equals DINO's ``cosine_scheduler(start, end, epochs, niter_per_ep, warmup_epochs, warmup_start)[step]`` with
    ``total_steps = epochs * niter_per_ep`` and ``warmup_steps = warmup_epochs * niter_per_ep``; ``step >= total_steps``
    gives ``end``.
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"warmup_steps must be in [0, total_steps={total_steps}], got {warmup_steps}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if step >= total_steps:
        return float(end)
    if step < warmup_steps:
        return _linspace_at(step, warmup_steps, warmup_start, start)
    i = step - warmup_steps
    length = total_steps - warmup_steps
    return float(end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * i / length)))


def linear_warmup_then_constant(step: int, warmup_steps: int, start: float, end: float) -> float:
    """Teacher temperature: ``numpy.linspace(start, end, warmup_steps)[step]`` during warm-up, then ``end``.

    DINO's ``teacher_temp_schedule`` indexed by epoch (``step`` and ``warmup_steps`` in epochs, as the module passes
    them): ``end`` is reached at epoch ``warmup_steps - 1``; ``warmup_steps = 0`` gives ``end`` throughout (the
    DINO/DoRA ViT-S setting is start = end = 0.04).
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if step >= warmup_steps:
        return float(end)
    return _linspace_at(step, warmup_steps, start, end)
