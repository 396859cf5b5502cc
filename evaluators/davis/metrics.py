"""DAVIS-2017 semi-supervised scores, as ``davis2017-evaluation`` (``davis2017/metrics.py``, ``utils.py``) defines them.

* J (region similarity): IoU of the predicted and ground-truth masks of one object in one frame; 1 when both are empty.
* F (contour accuracy): F-measure of the two masks' one-pixel boundaries (:func:`seg2bmap`), each boundary pixel
  matching when the other boundary lies within a disk of radius ``bound_pix = ceil(bound_th * image diagonal)``
  (``bound_th`` = 0.008; a value >= 1 is a radius in pixels). Both boundaries empty: F = 1; one empty: F = 0.
* Per object, over the scored frames (all but the first and the last): mean (M), recall (R, fraction of frames > 0.5)
  and decay (D, mean of the first minus the last of 4 overlapping bins, :func:`db_statistics`).
* Global: the mean over all objects of all sequences of each statistic; J&F-Mean = (J-Mean + F-Mean) / 2.

Ground-truth label 255 (void) counts as background, as ``davis2017.davis.DAVIS`` reads it. Our own implementation
(numpy only, no OpenCV or scikit-image): the disk dilation is computed exactly with row-wise running windows.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

__all__ = [
    "BOUND_TH",
    "GLOBAL_COLUMNS",
    "ObjectScores",
    "bound_pixels",
    "db_statistics",
    "dilate_disk",
    "disk",
    "f_measure",
    "frame_scores",
    "jaccard",
    "seg2bmap",
    "summarize",
]

BOUND_TH = 0.008
GLOBAL_COLUMNS = ("J&F-Mean", "J-Mean", "J-Recall", "J-Decay", "F-Mean", "F-Recall", "F-Decay")
VOID_LABEL = 255


def _check_pair(gt: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    gt, pred = np.asarray(gt).astype(bool), np.asarray(pred).astype(bool)
    if gt.ndim != 2 or gt.shape != pred.shape:
        raise ValueError(f"masks must be 2-D and equal in shape, got {gt.shape} and {pred.shape}")
    return gt, pred


def jaccard(gt: np.ndarray, pred: np.ndarray) -> float:
    """Region similarity J: |gt & pred| / |gt | pred| of two binary (H, W) masks; 1.0 when both are empty."""
    gt, pred = _check_pair(gt, pred)
    union = int(np.count_nonzero(gt | pred))
    if union == 0:
        return 1.0
    return int(np.count_nonzero(gt & pred)) / union


def seg2bmap(mask: np.ndarray) -> np.ndarray:
    """One-pixel-wide boundary map of a binary (H, W) mask (D. Martin's ``seg2bmap``, as in davis2017-evaluation).

    A pixel is a boundary pixel when it differs from its east, south or south-east neighbour (pixels beyond the image
    count as background); in the last row only the east neighbour counts, in the last column only the south one, and
    the bottom-right pixel is never a boundary. The boundary thus sits half a pixel towards the origin.
    """
    seg = np.asarray(mask).astype(bool)
    if seg.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {seg.shape}")
    east = np.zeros_like(seg)
    south = np.zeros_like(seg)
    south_east = np.zeros_like(seg)
    east[:, :-1] = seg[:, 1:]
    south[:-1, :] = seg[1:, :]
    south_east[:-1, :-1] = seg[1:, 1:]
    boundary = (seg ^ east) | (seg ^ south) | (seg ^ south_east)
    boundary[-1, :] = seg[-1, :] ^ east[-1, :]
    boundary[:, -1] = seg[:, -1] ^ south[:, -1]
    boundary[-1, -1] = False
    return boundary


def bound_pixels(shape: tuple[int, int], bound_th: float = BOUND_TH) -> int:
    """Tolerance radius in pixels: ``ceil(bound_th * hypot(H, W))`` when ``bound_th`` < 1, else ``bound_th`` itself."""
    if bound_th <= 0:
        raise ValueError(f"bound_th must be > 0, got {bound_th}")
    if bound_th >= 1:
        if bound_th != int(bound_th):
            raise ValueError(
                f"bound_th >= 1 is a radius in pixels and must be a whole number, got {bound_th}"
            )
        return int(bound_th)
    return int(math.ceil(bound_th * math.hypot(shape[0], shape[1])))


def disk(radius: int) -> np.ndarray:
    """The (2r+1, 2r+1) disk structuring element ``x^2 + y^2 <= r^2`` (as ``skimage.morphology.disk``)."""
    steps = np.arange(-radius, radius + 1)
    return steps[None, :] ** 2 + steps[:, None] ** 2 <= radius**2


def dilate_disk(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary dilation of an (H, W) mask by :func:`disk` (``radius``), pixels beyond the image being background.

    For each row offset dy the disk is a horizontal run of half-width ``isqrt(r^2 - dy^2)``; each such run is applied
    with a cumulative sum along the rows, then shifted by dy. Exact, O(r * H * W).
    """
    mask = np.asarray(mask).astype(bool)
    if radius <= 0:
        return mask.copy()
    height, width = mask.shape
    cumulative = np.zeros((height, width + 1), dtype=np.int32)
    np.cumsum(mask, axis=1, out=cumulative[:, 1:])
    columns = np.arange(width)
    runs: dict[int, np.ndarray] = {}
    out = np.zeros_like(mask)
    for dy in range(-radius, radius + 1):
        half = math.isqrt(radius * radius - dy * dy)
        if half not in runs:
            hi = np.minimum(columns + half + 1, width)
            lo = np.maximum(columns - half, 0)
            runs[half] = (cumulative[:, hi] - cumulative[:, lo]) > 0
        run = runs[half]
        # out[y] |= run[y + dy]
        if dy >= 0:
            out[: height - dy] |= run[dy:]
        else:
            out[-dy:] |= run[: height + dy]
    return out


def f_measure(gt: np.ndarray, pred: np.ndarray, bound_th: float = BOUND_TH) -> float:
    """Contour accuracy F of binary (H, W) masks (davis2017-evaluation ``f_measure``).

    Precision: the fraction of predicted boundary pixels within ``bound_pix`` (:func:`bound_pixels`) of the
    ground-truth boundary; recall: the converse. No predicted boundary: precision 1, recall 0 (1 and 1 when the
    ground truth has none either); no ground-truth boundary: precision 0, recall 1. F = 2PR / (P + R), 0 when P + R = 0.
    """
    gt, pred = _check_pair(gt, pred)
    radius = bound_pixels(gt.shape, bound_th)
    fg_boundary, gt_boundary = seg2bmap(pred), seg2bmap(gt)
    n_fg, n_gt = int(np.count_nonzero(fg_boundary)), int(np.count_nonzero(gt_boundary))
    if n_fg == 0 and n_gt == 0:
        precision, recall = 1.0, 1.0
    elif n_fg == 0:
        precision, recall = 1.0, 0.0
    elif n_gt == 0:
        precision, recall = 0.0, 1.0
    else:
        # dilation only matters next to boundary pixels: work on their bounding box grown by the radius (exact)
        rows, cols = np.nonzero(fg_boundary | gt_boundary)
        y0, y1 = max(0, rows.min() - radius), min(gt.shape[0], rows.max() + radius + 1)
        x0, x1 = max(0, cols.min() - radius), min(gt.shape[1], cols.max() + radius + 1)
        fg_b, gt_b = fg_boundary[y0:y1, x0:x1], gt_boundary[y0:y1, x0:x1]
        fg_dil, gt_dil = dilate_disk(fg_b, radius), dilate_disk(gt_b, radius)
        precision = int(np.count_nonzero(fg_b & gt_dil)) / n_fg
        recall = int(np.count_nonzero(gt_b & fg_dil)) / n_gt
    if precision + recall == 0:
        return 0.0
    return 2 * precision * recall / (precision + recall)


def frame_scores(
    gt_labels: np.ndarray, pred_labels: np.ndarray, num_objects: int, bound_th: float = BOUND_TH
) -> tuple[np.ndarray, np.ndarray]:
    """J and F of objects 1..``num_objects`` in one frame of (H, W) label maps: two (num_objects,) float arrays.

    Ground-truth 255 (void) is background; object k is the pixels labelled k.
    """
    gt = np.asarray(gt_labels)
    pred = np.asarray(pred_labels)
    if gt.shape != pred.shape:
        raise ValueError(f"ground truth {gt.shape} and prediction {pred.shape} differ in size")
    gt = np.where(gt == VOID_LABEL, 0, gt)
    j = np.empty(num_objects, dtype=np.float64)
    f = np.empty(num_objects, dtype=np.float64)
    for k in range(1, num_objects + 1):
        gt_k, pred_k = gt == k, pred == k
        j[k - 1] = jaccard(gt_k, pred_k)
        f[k - 1] = f_measure(gt_k, pred_k, bound_th)
    return j, f


def db_statistics(values: Iterable[float]) -> tuple[float, float, float]:
    """Mean, recall (fraction > 0.5) and decay of one object's per-frame scores (davis2017 ``utils.db_statistics``).

    Decay: 4 bins over the frames with bounds ``round(linspace(1, n, 5)) - 1``, bin i holding frames ``ids[i]`` to
    ``ids[i+1]`` inclusive (neighbouring bins share a frame); decay = mean of bin 0 - mean of bin 3. NaNs are
    ignored (``nanmean``); no frame at all gives NaN. (The reference casts the bounds to uint8, which wraps past 256
    frames; we do not.)
    """
    per_frame = np.asarray(list(values), dtype=np.float64)
    if per_frame.size == 0:
        return math.nan, math.nan, math.nan
    finite = per_frame[~np.isnan(per_frame)]
    mean = float(finite.mean()) if finite.size else math.nan
    recall = float(np.mean(per_frame > 0.5))  # as the reference: a NaN frame counts as not recalled
    ids = (np.round(np.linspace(1, per_frame.size, 5) + 1e-10) - 1).astype(np.int64)
    bins = [per_frame[ids[i] : ids[i + 1] + 1] for i in range(4)]

    def nanmean(x: np.ndarray) -> float:
        x = x[~np.isnan(x)]
        return float(x.mean()) if x.size else math.nan

    return mean, recall, nanmean(bins[0]) - nanmean(bins[3])


@dataclass(frozen=True)
class ObjectScores:
    """Statistics of one object (``<sequence>_<object id>``) over its scored frames, as fractions in [0, 1]."""

    name: str
    j_mean: float
    j_recall: float
    j_decay: float
    f_mean: float
    f_recall: float
    f_decay: float


def summarize(
    per_sequence: Mapping[str, tuple[np.ndarray, np.ndarray]],
) -> tuple[dict[str, float], list[ObjectScores]]:
    """Global DAVIS statistics and per-object rows from ``{sequence: (J (K, T), F (K, T))}`` per-frame scores.

    Sequences are taken in sorted order. Returns ``({"J&F-Mean", "J-Mean", "J-Recall", "J-Decay", "F-Mean",
    "F-Recall", "F-Decay"}, objects)``; every global number is the mean over all objects (fractions in [0, 1]).
    """
    objects: list[ObjectScores] = []
    for name in sorted(per_sequence):
        j_frames, f_frames = (np.asarray(a, dtype=np.float64) for a in per_sequence[name])
        if j_frames.ndim != 2 or j_frames.shape != f_frames.shape:
            raise ValueError(
                f"sequence {name!r}: J and F must both be (objects, frames), got {j_frames.shape} and {f_frames.shape}"
            )
        for k in range(j_frames.shape[0]):
            jm, jr, jd = db_statistics(j_frames[k])
            fm, fr, fd = db_statistics(f_frames[k])
            objects.append(ObjectScores(f"{name}_{k + 1}", jm, jr, jd, fm, fr, fd))
    if not objects:
        raise ValueError("no object was scored: nothing to summarize")

    def mean(field: str) -> float:
        return float(np.mean([getattr(o, field) for o in objects]))

    j_mean, f_mean = mean("j_mean"), mean("f_mean")
    scores = {
        "J&F-Mean": (j_mean + f_mean) / 2,
        "J-Mean": j_mean,
        "J-Recall": mean("j_recall"),
        "J-Decay": mean("j_decay"),
        "F-Mean": f_mean,
        "F-Recall": mean("f_recall"),
        "F-Decay": mean("f_decay"),
    }
    return scores, objects
