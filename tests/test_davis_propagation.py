"""DAVIS label propagation, the pure part: the neighbourhood window and the propagation arithmetic against DINO's
dense loops, the soft-label normalisation and the propagator's frame memory."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from evaluators.davis.propagation import (
    LabelPropagator,
    labels_from_soft,
    neighbourhood_mask,
    normalise_channels,
    propagate,
)


def dino_neighbourhood(h: int, w: int, r: int) -> torch.Tensor:
    """DINO's restrict_neighborhood, loop for loop."""
    mask = torch.zeros(h, w, h, w)
    for i in range(h):
        for j in range(w):
            for p in range(2 * r + 1):
                for q in range(2 * r + 1):
                    if 0 <= i - r + p < h and 0 <= j - r + q < w:
                        mask[i, j, i - r + p, j - r + q] = 1
    return mask.reshape(h * w, h * w)


def dino_propagate(target, sources, labels, topk, mask):
    """DINO's label_propagation arithmetic: target (N, d), sources (C, N, d), labels (C, L, N)."""
    contexts, n, _ = sources.shape
    aff = torch.exp(torch.bmm(target.unsqueeze(0).repeat(contexts, 1, 1), sources.transpose(1, 2)) / 0.1)
    if mask is not None:
        aff *= mask.unsqueeze(0)
    aff = aff.transpose(2, 1).reshape(-1, n)
    kth, _ = torch.min(torch.topk(aff, dim=0, k=topk)[0], dim=0)
    aff[aff < kth] = 0
    aff = aff / aff.sum(dim=0, keepdim=True)
    segs = labels.transpose(2, 1).reshape(-1, labels.shape[1]).T
    return segs @ aff


def test_neighbourhood_mask_is_dinos_square_window():
    for grid, radius in [((5, 7), 1), ((6, 4), 2), ((3, 3), 5)]:
        expected = dino_neighbourhood(*grid, radius).bool()
        torch.testing.assert_close(neighbourhood_mask(grid, radius), expected.T)  # [source, target]
        torch.testing.assert_close(neighbourhood_mask(grid, radius), expected)  # symmetric
    assert neighbourhood_mask((4, 4), 0).all()


@pytest.mark.parametrize(
    ("radius", "contexts", "discrete"),
    [(0, 3, False), (2, 3, False), (1, 1, False), (1, 2, True), (0, 2, True)],
)
def test_propagate_equals_dinos_arithmetic(radius, contexts, discrete):
    """Random features, windows with fewer than k sources (radius 1, one context: corners see 4) and features with
    many exact ties (discrete), against DINO's dense arithmetic."""
    generator = torch.Generator().manual_seed(radius + 10 * contexts)
    grid, labels_n = (5, 6), 4
    n = grid[0] * grid[1]
    if discrete:  # 3 distinct feature vectors: lots of exactly equal affinities
        palette = F.normalize(torch.randn(3, 16, generator=generator), dim=1)
        target = palette[torch.randint(0, 3, (n,), generator=generator)]
        sources = palette[torch.randint(0, 3, (contexts, n), generator=generator)]
    else:
        target = F.normalize(torch.randn(n, 16, generator=generator), dim=1)
        sources = F.normalize(torch.randn(contexts, n, 16, generator=generator), dim=2)
    labels = torch.rand(contexts, labels_n, n, generator=generator)
    mask = neighbourhood_mask(grid, radius) if radius else None
    ours = propagate(target, sources, labels, topk=5, temperature=0.1, neighbourhood=mask, chunk_size=7)
    torch.testing.assert_close(ours, dino_propagate(target, sources, labels, 5, mask), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("exact_ties", [False, True])
def test_propagate_stays_float32_under_mixed_precision(exact_ties):
    """`dora validate --trainer.precision bf16-mixed` (or 16-mixed) runs the evaluator under autocast: the affinities
    and votes must not be rounded to bf16 (nor fail: index_add_ of bf16 into float32), in both vote paths."""
    generator = torch.Generator().manual_seed(5)
    n, contexts = 30, 2
    target = F.normalize(torch.randn(n, 16, generator=generator), dim=1)
    sources = F.normalize(torch.randn(contexts, n, 16, generator=generator), dim=2)
    if exact_ties:  # the sparse (index_add_) path: more than k sources tie
        sources[:, :8] = target[:1]
    labels = torch.rand(contexts, 3, n, generator=generator)
    expected = propagate(target, sources, labels, topk=5, temperature=0.1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = propagate(target, sources, labels, topk=5, temperature=0.1)
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, expected, rtol=0, atol=0)


def test_neighbourhood_really_restricts():
    """A 1x20 strip: target patch 19 looks exactly like source patch 0 (label 1); its window neighbours are
    orthogonal to it (label 0). Unrestricted it takes label 1; with radius 2 it can only vote from 17..19."""
    n = 20
    sources = torch.zeros(1, n, 3)
    sources[0, :, 0] = 1.0  # every source looks like feature e0 ...
    sources[0, 0] = torch.tensor([0.0, 1.0, 0.0])  # ... but source 0 looks like e1
    labels = torch.zeros(1, 2, n)
    labels[0, 0] = 1.0
    labels[0, :, 0] = torch.tensor([0.0, 1.0])  # source 0 has label 1, all others label 0
    target = torch.zeros(n, 3)
    target[:, 2] = 1.0  # orthogonal to everything ...
    target[19] = torch.tensor([0.0, 1.0, 0.0])  # ... except target 19, identical to source 0
    free = propagate(target, sources, labels, topk=1, neighbourhood=None)
    window = propagate(target, sources, labels, topk=1, neighbourhood=neighbourhood_mask((1, n), 2))
    assert free[:, 19].argmax() == 1
    assert window[:, 19].argmax() == 0
    assert (window[1, 3:] == 0).all()  # only targets 0..2 have source 0 in their window
    torch.testing.assert_close(window[:, 19], torch.tensor([1.0, 0.0]))


def test_normalise_channels_and_labels_from_soft():
    soft = torch.tensor([[[0.2, 0.4], [0.6, 1.0]], [[0.0, 0.0], [0.0, 0.0]], [[0.5, 0.5], [0.5, 0.5]]])
    out = normalise_channels(soft.clone())
    torch.testing.assert_close(out[0], torch.tensor([[0.0, 0.25], [0.5, 1.0]]))
    torch.testing.assert_close(out[1], soft[1])  # max not > 0: untouched
    torch.testing.assert_close(out[2], torch.ones(2, 2))  # constant positive channel (DINO: NaN)
    # 2 labels on a 1x2 grid, patch 4: left patch label 0, right patch label 1 -> left/right halves after upsampling
    labels = labels_from_soft(torch.tensor([[0.9, 0.1], [0.1, 0.9]]), (1, 2), 4)
    assert labels.shape == (4, 8)
    assert (labels[:, :4] == 0).all() and (labels[:, 4:] == 1).all()


def test_propagator_keeps_only_the_last_frames():
    first = torch.randn(12, 8)
    propagator = LabelPropagator(first, torch.zeros(3, 4, dtype=torch.long), 2, n_last_frames=3, radius=1)
    for _ in range(6):
        soft = propagator.step(torch.randn(12, 8))
        assert soft.shape == (2, 12)
        torch.testing.assert_close(soft.sum(dim=0), torch.ones(12))
    assert len(propagator.recent) == 3
