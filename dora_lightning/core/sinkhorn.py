"""Sinkhorn-Knopp equipartition of patches over object prototypes (spec section A.4).

Pure torch, no Lightning. The arithmetic follows the official DoRA implementation step by step (per-sample max
subtraction, inf guard, global normalisation, alternating prototype/patch normalisations, final rescale by N), so that
the golden tensors of the official code are reproduced; it is written independently from the formulas of the spec.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .precision import fp32_region

__all__ = ["sinkhorn_knopp"]


def _replace_infs_by_sample_max(q: Tensor) -> Tensor:
    """Replace +-inf entries of each sample by the largest finite entry of that sample (official ``shoot_infs``)."""
    is_inf = torch.isinf(q)  # no early return when there is none: asking would wait for the device
    finite = torch.where(is_inf, torch.zeros_like(q), q)
    sample_max = finite.amax(dim=(-2, -1), keepdim=True)
    return torch.where(is_inf, sample_max.expand_as(q), q)


@torch.no_grad()
def sinkhorn_knopp(
    scores: Tensor, epsilon: float = 0.05, num_iters: int = 30, log_domain: bool = False
) -> Tensor:
    """Balanced soft assignment of N patches to K prototypes, one transport problem per sample.

    Args:
        scores: (B, N, K) similarities of N patches to K prototypes (any float dtype).
        epsilon: entropic temperature; smaller means harder assignments.
        num_iters: number of (prototype, patch) normalisation rounds.
        log_domain: run the same normalisations on log-probabilities (logsumexp), which never underflows; equal to
            the official arithmetic wherever that one does not underflow (the corrected default uses it).

    Returns:
        (B, N, K) float32 assignment in which every patch's row sums to 1 and every prototype's column sums to ~N/K.
        No sums cross samples. Computed in float32 under ``no_grad`` (autocast disabled), whatever the input dtype,
        because the exponentials of ``scores / epsilon`` over- and underflow in half precision.

    This is the official arithmetic (spec A.4): ``Q = exp(S/eps - max_sample(S/eps))``, infs replaced by the sample's
    max, ``Q /= sum(Q)``, then ``num_iters`` times [each prototype's mass -> 1/K, each patch's mass -> 1/N], then ``Q *= N``.
    A patch whose K scores all lie more than ~5 (= 104 * eps) below the sample's maximum underflows to an all-zero
    column and, as in the official code, turns that sample's result into NaN.
    """
    if scores.ndim != 3:
        raise ValueError(f"scores must have shape (B, N, K), got {tuple(scores.shape)}")
    if not scores.is_floating_point():
        raise ValueError(f"scores must be a floating-point tensor, got dtype {scores.dtype}")
    if scores.shape[1] == 0 or scores.shape[2] == 0:
        raise ValueError(
            f"scores needs at least one patch and one prototype, got shape {tuple(scores.shape)}"
        )
    if not epsilon > 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon}")
    if num_iters < 0:
        raise ValueError(f"num_iters must be >= 0, got {num_iters}")

    if log_domain:
        return _sinkhorn_knopp_log(scores, epsilon, num_iters)
    with fp32_region(scores.device):
        logits = scores.detach().to(torch.float32) / epsilon
        logits = logits - logits.amax(dim=(-2, -1), keepdim=True)
        q = torch.exp(logits).transpose(-2, -1)  # (B, K, N)
        q = _replace_infs_by_sample_max(q)
        q = q / q.sum(dim=(-2, -1), keepdim=True)

        num_prototypes, num_patches = q.shape[-2], q.shape[-1]
        for _ in range(num_iters):
            q = q / q.sum(dim=-1, keepdim=True)  # each prototype's total mass ...
            q = q / num_prototypes  # ... becomes 1/K
            q = q / q.sum(dim=-2, keepdim=True)  # each patch's total mass ...
            q = q / num_patches  # ... becomes 1/N
        q = q * num_patches  # each patch's assignment now sums to 1
        return q.transpose(-2, -1).contiguous()


def _sinkhorn_knopp_log(scores: Tensor, epsilon: float, num_iters: int) -> Tensor:
    """The normalisations of :func:`sinkhorn_knopp` on log-probabilities: no exp before the end, so no underflow."""
    with fp32_region(scores.device):
        log_q = (scores.detach().to(torch.float32) / epsilon).transpose(-2, -1)  # (B, K, N)
        log_q = log_q - torch.logsumexp(log_q, dim=(-2, -1), keepdim=True)
        num_prototypes, num_patches = log_q.shape[-2], log_q.shape[-1]
        log_k, log_n = math.log(num_prototypes), math.log(num_patches)
        for _ in range(num_iters):
            log_q = log_q - torch.logsumexp(log_q, dim=-1, keepdim=True) - log_k
            log_q = log_q - torch.logsumexp(log_q, dim=-2, keepdim=True) - log_n
        return torch.exp(log_q + log_n).transpose(-2, -1).contiguous()
