"""Collapse checks for a pretrained backbone: feature rank and spread, and the teacher entropy logged during fit.

Self-distillation can collapse in two ways (DINO, section 5.3): every input maps to the same output (teacher
entropy -> 0, features of all images identical) or the teacher output becomes uniform (entropy -> log(out_dim)).
:func:`feature_report` measures the first on real images through the backbone's CLS features;
:func:`last_logged_scalar` reads the teacher entropy that DoRAModule logs to TensorBoard.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader

__all__ = ["effective_rank", "feature_report", "last_logged_scalar"]


def effective_rank(features: Tensor) -> float:
    """RankMe (Garrido et al., 2023): exp of the entropy of the normalised singular values of (N, d) features.

    1 for features that all lie on one line, min(N, d) for perfectly spread ones.
    """
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"need (N >= 2, d) features, got {tuple(features.shape)}")
    singular = torch.linalg.svdvals(features.double())
    p = singular / singular.sum().clamp_min(1e-300) + 1e-12
    return float(torch.exp(-(p * p.log()).sum()))


@torch.no_grad()
def feature_report(backbone: torch.nn.Module, loader: DataLoader, max_images: int = 2048) -> dict[str, float]:
    """CLS features (final norm) of up to ``max_images`` images of ``loader``: their effective rank, the mean std
    of the L2-normalised features per dimension (0 when collapsed), and the mean cosine similarity between images."""
    from dora_lightning.models.backbone import forward_features

    backbone.eval()
    device = next(backbone.parameters()).device
    chunks, seen = [], 0
    for images, *_ in loader:
        chunks.append(forward_features(backbone, images.to(device))[0].float().cpu())
        seen += images.shape[0]
        if seen >= max_images:
            break
    features = torch.cat(chunks)[:max_images]
    unit = F.normalize(features, dim=1)
    n = unit.shape[0]
    mean_cosine = (unit.sum(0).square().sum() - n) / (n * (n - 1))
    return {
        "images": float(n),
        "feature_dim": float(unit.shape[1]),
        "effective_rank": effective_rank(features - features.mean(0)),
        "feature_std": float(unit.std(dim=0).mean()),
        "mean_cosine": float(mean_cosine),
    }


def logged_scalars(log_dir: str | Path, tag: str) -> list[tuple[int, float]]:
    """Every ``(step, value)`` of the ``tag`` scalar in the TensorBoard event files under ``log_dir``, by step (a step
    written twice, by a resumed run: its later value)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    points: dict[int, float] = {}
    for events in sorted(Path(log_dir).rglob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
        accumulator.Reload()
        if tag in accumulator.Tags().get("scalars", []):
            points.update((int(event.step), float(event.value)) for event in accumulator.Scalars(tag))
    return sorted(points.items())


def last_logged_scalar(log_dir: str | Path, tag: str) -> tuple[int, float] | None:
    """``(step, value)`` of the last ``tag`` scalar in the TensorBoard event files under ``log_dir``, or None."""
    points = logged_scalars(log_dir, tag)
    return points[-1] if points else None


def uniform_entropy(out_dim: int) -> float:
    """The teacher entropy of a uniform output over ``out_dim`` prototypes (the second collapse mode)."""
    return math.log(out_dim)
