"""Semi-supervised label propagation over video frames (DINO ``eval_video_segmentation.py``; spec D).

Each frame is a grid of L2-normalised patch features. A target frame's soft labels are a weighted vote of the labels of
its context frames: the first frame (ground truth, one-hot) and the ``n_last_frames`` most recent predictions (their
soft labels). Source patch s votes for target patch t with affinity ``exp(<f_t, f_s> / temperature)`` if s lies in the
square window of ``radius`` patches around t (DINO's ``restrict_neighborhood``), and only the ``topk`` largest
affinities per target, over all context frames together, are kept and normalised to sum to 1.
:func:`labels_from_soft` then upsamples the soft labels by the patch size (bilinear), min-max normalises each label
channel and takes the argmax.

Pure PyTorch (any device), no Lightning. Memory: the contexts' features only, plus ``contexts x N x chunk`` affinities.
"""

from __future__ import annotations

from collections import deque

import torch
import torch.nn.functional as F
from torch import Tensor

from dora_lightning.core.precision import fp32_region

__all__ = [
    "LabelPropagator",
    "labels_from_soft",
    "neighbourhood_mask",
    "normalise_channels",
    "one_hot",
    "propagate",
]


def neighbourhood_mask(
    grid: tuple[int, int], radius: int, device: torch.device | str | None = None
) -> Tensor:
    """(N, N) bool, N = gh * gw: entry [s, t] says patch s is within ``radius`` rows and columns of patch t.

    Patches are numbered row-major (patch n at row ``n // gw``, column ``n % gw``); the window is square (Chebyshev
    distance <= radius), as DINO's ``restrict_neighborhood``. ``radius`` <= 0 means no restriction (all True).
    """
    gh, gw = grid
    n = gh * gw
    if radius <= 0:
        return torch.ones((n, n), dtype=torch.bool, device=device)
    index = torch.arange(n, device=device)
    rows, cols = index // gw, index % gw
    near_rows = (rows[:, None] - rows[None, :]).abs() <= radius
    near_cols = (cols[:, None] - cols[None, :]).abs() <= radius
    return near_rows & near_cols


def one_hot(labels: Tensor, num_labels: int) -> Tensor:
    """(num_labels, N) float one-hot encoding of integer labels of any shape (flattened row-major)."""
    flat = labels.reshape(-1).long()
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= num_labels):
        raise ValueError(f"labels must lie in [0, {num_labels}), got [{int(flat.min())}, {int(flat.max())}]")
    return F.one_hot(flat, num_labels).T.float()


@torch.no_grad()
def propagate(
    target: Tensor,
    sources: Tensor,
    source_labels: Tensor,
    topk: int = 5,
    temperature: float = 0.1,
    neighbourhood: Tensor | None = None,
    chunk_size: int = 4096,
) -> Tensor:
    """Soft labels (L, N) of a target frame from its context frames.

    Args:
        target: (N, d) L2-normalised target patch features.
        sources: (C, N, d) L2-normalised features of the C context frames (same grid as the target).
        source_labels: (C, L, N) soft labels of the context frames (one-hot for the first frame).
        topk: affinities kept per target patch, over all C x N sources; sources tied with the k-th largest are kept
            too (as DINO's threshold).
        temperature: affinity ``exp(cosine / temperature)``.
        neighbourhood: optional (N, N) bool [source, target] window (:func:`neighbourhood_mask`); sources outside it
            get affinity 0.
        chunk_size: target patches processed at once (memory ``C x N x chunk_size`` floats).

    Only the kept affinities are computed, as ``exp((cos - max cos) / T)`` with the max over the target's allowed
    sources: a common factor per target that the final normalisation removes, so the result equals DINO's dense
    ``exp(cos / T)`` arithmetic while never overflowing for small temperatures. The top-k is chosen on the cosines
    (exp is monotonic).
    """
    if sources.ndim != 3 or target.ndim != 2 or sources.shape[1:] != target.shape:
        raise ValueError(
            f"target must be (N, d) and sources (C, N, d); got {tuple(target.shape)} and {tuple(sources.shape)}"
        )
    contexts, n, _ = sources.shape
    if source_labels.shape[0] != contexts or source_labels.shape[2] != n:
        raise ValueError(f"source_labels must be ({contexts}, L, {n}), got {tuple(source_labels.shape)}")
    if not 1 <= topk <= contexts * n:
        raise ValueError(f"topk must be in [1, {contexts * n}] (contexts x patches), got {topk}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if neighbourhood is not None and neighbourhood.shape != (n, n):
        raise ValueError(f"neighbourhood must be ({n}, {n}), got {tuple(neighbourhood.shape)}")
    with fp32_region(target.device):  # under bf16/16-mixed too: affinities and votes in float32
        target = target.float()
        flat_sources = sources.float().reshape(contexts * n, -1)  # (C*N, d), context-major
        flat_labels = source_labels.float().permute(0, 2, 1).reshape(contexts * n, -1)  # (C*N, L)
        out = target.new_empty((n, flat_labels.shape[1]))
        for start in range(0, n, chunk_size):
            stop = min(n, start + chunk_size)
            similarity = target[start:stop] @ flat_sources.T  # (T targets, C*N sources)
            # -inf outside the window (an in-place add is the fastest way on CPU)
            if neighbourhood is not None:
                outside = ~neighbourhood[:, start:stop].T  # (T, N)
                bias = similarity.new_zeros(outside.shape).masked_fill_(outside, float("-inf"))
                similarity.view(stop - start, contexts, n).add_(bias.unsqueeze(1))
            rows, cols, peak, exactly_k = _kept_sources(similarity, topk)
            weights = ((similarity[rows, cols] - peak[rows]) / temperature).exp()
            if exactly_k:  # k sources per target: a dense, deterministic sum (also on GPUs)
                weights = weights.view(stop - start, topk)
                votes = torch.einsum("tk,tkl->tl", weights, flat_labels[cols].view(stop - start, topk, -1))
                totals = weights.sum(dim=1)
            else:
                totals = weights.new_zeros(stop - start).index_add_(0, rows, weights)
                votes = weights.new_zeros((stop - start, flat_labels.shape[1]))
                votes.index_add_(0, rows, weights[:, None] * flat_labels[cols])
            out[start:stop] = votes / totals[:, None]
    return out.T


def _kept_sources(similarity: Tensor, topk: int) -> tuple[Tensor, Tensor, Tensor, bool]:
    """(rows, cols) of the sources kept per target row: every allowed (finite) source >= the row's k-th largest
    similarity, ties included (a row with fewer than k allowed sources keeps them all); each row's peak; and whether
    every row keeps exactly k sources (then rows are ``arange(T).repeat_interleave(k)``)."""
    extra = min(topk + 1, similarity.shape[1])
    values, indices = similarity.topk(extra, dim=1)  # sorted, largest first
    kth = values[:, topk - 1 : topk]
    tied = extra > topk and bool(((values[:, topk:] == kth) & kth.isfinite()).any())
    if tied:  # some row has more than k sources at the k-th value: keep them all, as DINO's threshold does
        rows, cols = ((similarity >= kth) & similarity.isfinite()).nonzero(as_tuple=True)
        return rows, cols, values[:, 0], False
    keep = values[:, :topk].isfinite()  # the usual case: the k largest (fewer where the window holds fewer)
    rows = torch.arange(similarity.shape[0], device=similarity.device)[:, None].expand(-1, topk)[keep]
    cols = indices[:, :topk][keep]
    return rows, cols, values[:, 0], bool(keep.all())


def normalise_channels(soft: Tensor) -> Tensor:
    """Per-channel min-max normalisation of (L, H, W) scores, as DINO's ``norm_mask``.

    A channel whose maximum is not > 0 is left as is. (A constant positive channel, which DINO divides by zero into
    NaN, becomes all ones.)
    """
    low = soft.amin(dim=(1, 2), keepdim=True)
    high = soft.amax(dim=(1, 2), keepdim=True)
    spread = high - low
    scaled = torch.where(spread > 0, (soft - low) / spread.clamp_min(torch.finfo(soft.dtype).tiny), 1.0)
    return torch.where(high > 0, scaled, soft)


def labels_from_soft(soft: Tensor, grid: tuple[int, int], patch_size: int) -> Tensor:
    """Hard labels (gh * p, gw * p) long from (L, N) soft labels on a (gh, gw) grid.

    Upsample by the patch size (bilinear, ``align_corners=False``), :func:`normalise_channels`, argmax over labels.
    """
    gh, gw = grid
    maps = soft.float().reshape(1, soft.shape[0], gh, gw)
    maps = F.interpolate(maps, size=(gh * patch_size, gw * patch_size), mode="bilinear", align_corners=False)[
        0
    ]
    return normalise_channels(maps).argmax(dim=0)


class LabelPropagator:
    """The propagation state of one video: the first frame and a queue of the ``n_last_frames`` latest predictions.

    Args:
        first_features: (N, d) patch features of the first frame (normalised here).
        first_labels: (gh, gw) integer ground-truth labels of the first frame on the patch grid, in [0, num_labels).
        num_labels: L, background included (objects + 1).
        n_last_frames: predicted frames kept as context besides the first frame.
        topk, temperature, chunk_size: as in :func:`propagate`.
        radius: neighbourhood window radius in patches (:func:`neighbourhood_mask`); <= 0: no restriction.

    :meth:`step` takes each following frame's features in order and returns its soft labels (L, N).
    """

    def __init__(
        self,
        first_features: Tensor,
        first_labels: Tensor,
        num_labels: int,
        n_last_frames: int = 7,
        topk: int = 5,
        temperature: float = 0.1,
        radius: int = 12,
        chunk_size: int = 4096,
    ) -> None:
        if n_last_frames < 0:
            raise ValueError(f"n_last_frames must be >= 0, got {n_last_frames}")
        self.grid = (int(first_labels.shape[0]), int(first_labels.shape[1]))
        n = self.grid[0] * self.grid[1]
        if first_features.ndim != 2 or first_features.shape[0] != n:
            raise ValueError(
                f"first_features must be ({n}, d) for the {self.grid[0]}x{self.grid[1]} label grid, "
                f"got {tuple(first_features.shape)}"
            )
        self.topk, self.temperature, self.chunk_size = int(topk), float(temperature), int(chunk_size)
        self.first = (
            F.normalize(first_features.float(), dim=-1),
            one_hot(first_labels, num_labels).to(first_features.device),
        )
        self.recent: deque[tuple[Tensor, Tensor]] = deque(maxlen=n_last_frames)
        self.neighbourhood = (
            neighbourhood_mask(self.grid, radius, device=first_features.device) if radius > 0 else None
        )

    @torch.no_grad()
    def step(self, features: Tensor) -> Tensor:
        """Soft labels (L, N) of the next frame from its (N, d) features; the frame then joins the context queue."""
        features = F.normalize(features.float(), dim=-1)
        contexts = [self.first, *self.recent]
        soft = propagate(
            features,
            torch.stack([c[0] for c in contexts]),
            torch.stack([c[1] for c in contexts]),
            topk=self.topk,
            temperature=self.temperature,
            neighbourhood=self.neighbourhood,
            chunk_size=self.chunk_size,
        )
        if self.recent.maxlen:
            self.recent.append((features, soft))
        return soft
