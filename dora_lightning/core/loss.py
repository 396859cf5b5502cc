"""DoRA / DINO self-distillation losses, teacher centring and a collapse monitor.

Pure torch (no Lightning). Every function computes in float32 whatever the input dtype (spec G.3), and the
teacher side is always detached.

Shapes use T = frames per clip, B = clips, D = head output dim, k = tracked objects, V = local crops,
G = global views (DINO baseline only).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

__all__ = ["LossParts", "dino_loss", "dora_loss", "teacher_entropy", "update_center"]


@dataclass
class LossParts:
    """A loss value and its two averaged terms (for logging).

    ``total`` carries the gradient. ``masked`` is the mean student-masked-view term (for :func:`dino_loss`: the mean
    teacher-global vs other-student-global term), ``local`` the mean local-crop term; either is ``None`` when no such
    term exists (e.g. no local crops).
    """

    total: Tensor
    masked: Tensor | None
    local: Tensor | None


def _teacher_probs(teacher: Tensor, center: Tensor, teacher_temp: float) -> Tensor:
    """Centred, sharpened teacher distribution in float32, detached."""
    return F.softmax((teacher.detach().float() - center.detach().float()) / teacher_temp, dim=-1)


def _cross_entropy(p_teacher: Tensor, student: Tensor, student_temp: float) -> Tensor:
    """H(p, softmax(s / temp)) per row: ``-sum_d p log q`` over the last dim (no reduction)."""
    return -(p_teacher * F.log_softmax(student.float() / student_temp, dim=-1)).sum(dim=-1)


def _check_shapes(name: str, x: Tensor, ndim: int, tail: tuple[int, ...]) -> None:
    if x.ndim != ndim or tuple(x.shape[-len(tail) :]) != tail:
        raise ValueError(f"{name} must have {ndim} dims ending in {tail}, got shape {tuple(x.shape)}")


def dora_loss(
    teacher_global: Tensor,
    student_masked: Tensor,
    student_local: Tensor,
    center: Tensor,
    teacher_temp: float,
    student_temp: float = 0.1,
    official_compat: bool = False,
) -> LossParts:
    """DoRA loss between the teacher's unmasked global view and the student's masked views and local crops.

    Args:
        teacher_global: (T, B, D) teacher head logits of the unmasked global view of each frame.
        student_masked: (k, T, B, D) student logits of each object's masked view.
        student_local: (V, T, B, D) student logits of the V local crops (V may be 0).
        center: (1, D) teacher centre.
        teacher_temp, student_temp: softmax temperatures.
        official_compat: reproduce the released code's arithmetic (spec A.5) instead of the corrected default.

    With ``pT_t = softmax((teacher_t - c) / teacher_temp)``, ``Lm_jt = mean_b H(pT_t, masked_jt)`` and
    ``Ll_t = mean_v mean_b H(pT_t, local_vt)`` the corrected default (spec G.1) is
    ``mean_{j,t} 0.5 * (Lm_jt + Ll_t)``, or ``mean_{j,t} Lm_jt`` when V == 0.

    ``official_compat=True`` skips local crop 0 in ``Ll_t`` (DINO's ``v == iq`` rule), sets ``S_j = sum_t 0.5 (Lm_jt + Ll_t)``
    and aggregates with the unreset frame sum: ``F_0 = S_0 / T``, ``F_j = (F_{j-1} + S_j) / T``, ``total = sum_j F_j / k``;
    it needs V >= 2. In that mode ``masked`` / ``local`` still report the plain means ``mean_{j,t} Lm_jt`` and
    ``mean_t Ll_t`` (the latter over the locals the official code uses).

    Returns:
        :class:`LossParts` (float32 scalars).
    """
    if teacher_global.ndim != 3:
        raise ValueError(f"teacher_global must be (T, B, D), got shape {tuple(teacher_global.shape)}")
    t_frames, batch, dim = teacher_global.shape
    _check_shapes("student_masked", student_masked, 4, (t_frames, batch, dim))
    _check_shapes("student_local", student_local, 4, (t_frames, batch, dim))
    k = student_masked.shape[0]
    n_local = student_local.shape[0]
    if k == 0:
        raise ValueError("dora_loss needs at least one masked view (k >= 1)")

    p_t = _teacher_probs(teacher_global, center, teacher_temp)  # (T, B, D)
    # (k, T): batch-mean cross-entropy of each object's masked view per frame
    masked_jt = _cross_entropy(p_t.unsqueeze(0), student_masked, student_temp).mean(dim=-1)
    masked_part = masked_jt.mean()

    if official_compat:
        if n_local < 2:
            raise ValueError(
                f"official_compat needs at least 2 local crops (crop 0 is skipped), got V={n_local}"
            )
        local_t = (
            _cross_entropy(p_t.unsqueeze(0), student_local[1:], student_temp).mean(dim=-1).mean(dim=0)
        )  # (T,)
        per_object_sum = (0.5 * (masked_jt + local_t.unsqueeze(0))).sum(dim=1)  # S_j, (k,)
        frame_loss = per_object_sum.new_zeros(())
        total = per_object_sum.new_zeros(())
        for j in range(k):
            frame_loss = (frame_loss + per_object_sum[j]) / t_frames
            total = total + frame_loss
        return LossParts(total=total / k, masked=masked_part, local=local_t.mean())

    if n_local == 0:
        return LossParts(total=masked_part, masked=masked_part, local=None)
    local_t = _cross_entropy(p_t.unsqueeze(0), student_local, student_temp).mean(dim=-1).mean(dim=0)  # (T,)
    total = (0.5 * (masked_jt + local_t.unsqueeze(0))).mean()
    return LossParts(total=total, masked=masked_part, local=local_t.mean())


def dino_loss(
    teacher_globals: Tensor,
    student_globals: Tensor,
    student_local: Tensor,
    center: Tensor,
    teacher_temp: float,
    student_temp: float = 0.1,
) -> LossParts:
    """Plain DINO multi-crop loss applied frame by frame (the DINO baseline).

    Args:
        teacher_globals: (G, T, B, D) teacher logits of the G global views.
        student_globals: (G, T, B, D) student logits of the same global views.
        student_local: (V, T, B, D) student logits of the local crops (V may be 0).
        center, teacher_temp, student_temp: as in :func:`dora_loss`.

    Each teacher global view g is paired with every student view except global view g; the loss is the mean over all
    pairs, frames and batch rows of ``H(pT_g, student_view)``. ``masked`` reports the mean over global-global pairs and
    ``local`` the mean over global-local pairs (``None`` where there are no such pairs).
    """
    if teacher_globals.ndim != 4:
        raise ValueError(f"teacher_globals must be (G, T, B, D), got shape {tuple(teacher_globals.shape)}")
    n_global = teacher_globals.shape[0]
    tail = tuple(teacher_globals.shape[1:])
    _check_shapes("student_globals", student_globals, 4, tail)
    _check_shapes("student_local", student_local, 4, tail)
    if student_globals.shape[0] != n_global:
        raise ValueError(
            f"student_globals has {student_globals.shape[0]} views but teacher_globals has {n_global}"
        )
    n_local = student_local.shape[0]
    n_gg = n_global * (n_global - 1)
    n_gl = n_global * n_local
    if n_gg + n_gl == 0:
        raise ValueError("dino_loss needs at least one (teacher view, other student view) pair")

    p_t = _teacher_probs(teacher_globals, center, teacher_temp)  # (G, T, B, D)
    # (Gt, Gs, T) batch-mean cross-entropies of every teacher/student global pair, diagonal excluded below
    ce_gg = _cross_entropy(p_t.unsqueeze(1), student_globals.unsqueeze(0), student_temp).mean(dim=-1)
    off_diag = ~torch.eye(n_global, dtype=torch.bool, device=ce_gg.device)
    gg_sum = torch.where(
        off_diag.unsqueeze(-1), ce_gg, 0.0
    ).sum()  # a boolean index would wait for the device
    masked = gg_sum / (n_gg * ce_gg.shape[-1]) if n_gg else None
    if n_local:
        ce_gl = _cross_entropy(p_t.unsqueeze(1), student_local.unsqueeze(0), student_temp).mean(dim=-1)
        gl_sum = ce_gl.sum()
        local = gl_sum / ce_gl.numel()
    else:
        gl_sum, local = gg_sum.new_zeros(()), None
    t_frames = ce_gg.shape[-1]
    total = (gg_sum + gl_sum) / ((n_gg + n_gl) * t_frames)
    return LossParts(total=total, masked=masked, local=local)


@torch.no_grad()
def teacher_entropy(teacher_global: Tensor, center: Tensor, teacher_temp: float) -> Tensor:
    """Mean entropy (nats) of the centred, sharpened teacher distribution over all rows of ``(..., D)`` logits.

    Near 0: collapse to one dimension; near ``log D``: collapse to uniform.
    """
    logp = F.log_softmax((teacher_global.float() - center.float()) / teacher_temp, dim=-1)
    return -(logp.exp() * logp).sum(dim=-1).mean()


@torch.no_grad()
def update_center(center: Tensor, teacher_logits: Tensor, momentum: float = 0.9) -> Tensor:
    """Return ``momentum * center + (1 - momentum) * mean of all teacher rows`` in float32.

    ``teacher_logits`` is ``(..., D)``; every leading index is a row. When ``torch.distributed`` is initialised the row
    sum and the row count are all-reduced, so the result equals a single process seeing the global batch (ranks may
    hold different row counts; no rows anywhere gives NaN). Returns a new (1, D) tensor; ``center`` is not modified.
    """
    dim = teacher_logits.shape[-1]
    rows = teacher_logits.detach().float().reshape(-1, dim)
    stats = torch.cat(
        [rows.sum(dim=0), rows.new_full((1,), float(rows.shape[0]))]
    )  # a fill, no host-to-device copy
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(stats, op=dist.ReduceOp.SUM)
    batch_center = (stats[:-1] / stats[-1]).unsqueeze(0)
    return center.float() * momentum + batch_center * (1.0 - momentum)
