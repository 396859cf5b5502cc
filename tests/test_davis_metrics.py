"""DAVIS J and F, their per-object statistics and the global summary, on hand-made masks with known values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from evaluators.davis.metrics import (
    bound_pixels,
    db_statistics,
    dilate_disk,
    disk,
    f_measure,
    frame_scores,
    jaccard,
    seg2bmap,
    summarize,
)


def box(shape=(100, 100), rows=(0, 100), cols=(0, 50)) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[rows[0] : rows[1], cols[0] : cols[1]] = True
    return mask


def pixel(y: int, x: int, shape=(100, 100)) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[y, x] = True
    return mask


# ------------------------------------------------------------------------------------------------ J
def test_jaccard_known_values():
    gt = box((10, 20), cols=(0, 10))
    assert jaccard(gt, gt) == 1.0
    assert jaccard(gt, box((10, 20), cols=(10, 20))) == 0.0
    assert jaccard(gt, box((10, 20), cols=(5, 15))) == pytest.approx(50 / 150)  # half overlap: 1/3
    empty = np.zeros((10, 20), dtype=bool)
    assert jaccard(empty, empty) == 1.0  # both empty counts as perfect, as davis2017-evaluation
    assert jaccard(gt, empty) == 0.0 and jaccard(empty, gt) == 0.0


def test_jaccard_of_one_pixel_objects():
    assert jaccard(pixel(10, 10), pixel(10, 10)) == 1.0
    assert jaccard(pixel(10, 10), pixel(10, 11)) == 0.0


def test_jaccard_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match="equal in shape"):
        jaccard(np.zeros((4, 4)), np.zeros((4, 5)))


# ------------------------------------------------------------------------------------------------ boundaries
def test_seg2bmap_of_a_square_sits_half_a_pixel_towards_the_origin():
    mask = np.zeros((5, 5), dtype=bool)
    mask[1:3, 1:3] = True
    expected = np.array(
        [
            [1, 1, 1, 0, 0],
            [1, 0, 1, 0, 0],
            [1, 1, 1, 0, 0],
            [0, 0, 0, 0, 0],
            [0, 0, 0, 0, 0],
        ],
        dtype=bool,
    )
    np.testing.assert_array_equal(seg2bmap(mask), expected)


def test_seg2bmap_edge_rules():
    # a full mask has no boundary at all (the image border is not a boundary; bottom-right pixel never is)
    assert not seg2bmap(np.ones((6, 7), dtype=bool)).any()
    # the left half: its boundary is the last column of the half, over all rows (last row by the east rule)
    bmap = seg2bmap(box())
    assert bmap[:, 49].all() and bmap.sum() == 100


def test_disk_matches_skimage_definition():
    expected = np.array(
        [
            [0, 0, 1, 0, 0],
            [0, 1, 1, 1, 0],
            [1, 1, 1, 1, 1],
            [0, 1, 1, 1, 0],
            [0, 0, 1, 0, 0],
        ],
        dtype=bool,
    )
    np.testing.assert_array_equal(disk(2), expected)
    assert disk(8).sum() == 197  # skimage.morphology.disk(8).sum()


@pytest.mark.parametrize("radius", [0, 1, 2, 3, 5, 8])
def test_dilate_disk_equals_brute_force(radius):
    rng = np.random.default_rng(radius)
    mask = rng.random((37, 53)) < 0.02
    mask[0, 0] = mask[-1, -1] = mask[0, -1] = True  # corners: the border acts as background
    expected = np.zeros_like(mask)
    kernel = disk(radius)
    for y, x in zip(*np.nonzero(mask), strict=True):
        for dy, dx in zip(*np.nonzero(kernel), strict=True):
            yy, xx = y + dy - radius, x + dx - radius
            if 0 <= yy < mask.shape[0] and 0 <= xx < mask.shape[1]:
                expected[yy, xx] = True
    np.testing.assert_array_equal(dilate_disk(mask, radius), expected)


def test_bound_pixels():
    assert bound_pixels((480, 854)) == 8  # ceil(0.008 * 979.6)
    assert bound_pixels((480, 640)) == 7  # ceil(0.008 * 800) = ceil(6.4)
    assert bound_pixels((100, 100)) == 2  # ceil(1.13)
    assert bound_pixels((100, 100), bound_th=3) == 3  # >= 1: pixels
    with pytest.raises(ValueError, match="whole number"):
        bound_pixels((100, 100), bound_th=1.5)


# ------------------------------------------------------------------------------------------------ F
def test_f_measure_special_cases():
    gt = box()
    empty = np.zeros_like(gt)
    assert f_measure(gt, gt) == 1.0
    assert f_measure(empty, empty) == 1.0  # no boundary on either side
    assert f_measure(gt, empty) == 0.0  # precision 1, recall 0
    assert f_measure(empty, gt) == 0.0  # precision 0, recall 1
    assert f_measure(gt, box(cols=(60, 100))) == 0.0  # far apart: P = R = 0


@pytest.mark.parametrize(("offset", "expected"), [(0, 1.0), (1, 1.0), (2, 1.0), (3, 0.0), (10, 0.0)])
def test_f_measure_boundary_offset_against_the_tolerance(offset, expected):
    """100x100: tolerance ceil(0.008 * 141.4) = 2 px. Shifting the half-image boundary by <= 2 px keeps F = 1."""
    assert f_measure(box(), box(cols=(0, 50 + offset))) == expected


def test_f_measure_partial_precision():
    """An extra one-pixel blob far away adds 4 unmatched boundary pixels: P = 100/104, R = 1, F = 200/204."""
    gt = box()
    pred = gt | pixel(10, 90)
    assert f_measure(gt, pred) == pytest.approx(200 / 204)
    assert jaccard(gt, pred) == pytest.approx(5000 / 5001)


def test_f_measure_of_one_pixel_objects():
    assert f_measure(pixel(10, 10), pixel(10, 10)) == 1.0
    assert f_measure(pixel(10, 10), pixel(10, 11)) == 1.0  # 1 px away: within the 2 px tolerance
    assert f_measure(pixel(10, 10), pixel(10, 14)) == 0.0  # boundaries 3 px apart


def test_frame_scores_per_object_and_void_is_background():
    gt = np.zeros((100, 100), dtype=np.uint8)
    gt[:, :50] = 1
    gt[:, 50:] = 2
    gt[0, :] = 255  # void: background for scoring
    pred = gt.copy()
    pred[0, :] = 0
    j, f = frame_scores(gt, pred, num_objects=3)
    np.testing.assert_allclose(j, [1.0, 1.0, 1.0])  # object 3: empty in both -> 1
    np.testing.assert_allclose(f, [1.0, 1.0, 1.0])
    swapped = np.where(pred == 1, 2, np.where(pred == 2, 1, 0)).astype(np.uint8)
    j, _ = frame_scores(gt, swapped, num_objects=2)
    np.testing.assert_allclose(j, [0.0, 0.0])


# ------------------------------------------------------------------------------------------------ statistics
def test_db_statistics_uses_the_overlapping_linspace_bins():
    values = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2]
    mean, recall, decay = db_statistics(values)
    assert mean == pytest.approx(0.55)
    assert recall == 0.5  # 0.5 itself is not > 0.5
    # bins: frames 0-2 and 5-7 (ids round(linspace(1, 8, 5)) - 1 = [0, 2, 4, 5, 7]); np.array_split would give 0.6
    assert decay == pytest.approx(0.8 - 0.3)


def test_db_statistics_small_and_empty():
    assert db_statistics([0.7]) == (pytest.approx(0.7), 1.0, 0.0)
    _, _, decay = db_statistics([1.0, 0.8, 0.6, 0.4, 0.2])  # bins [0,1], [1,2], [2,3], [3,4]
    assert decay == pytest.approx(0.9 - 0.3)
    assert all(math.isnan(v) for v in db_statistics([]))


def test_summarize_means_over_objects():
    per_sequence = {
        "b": (np.array([[1.0, 1.0, 1.0, 1.0]]), np.array([[0.5, 0.5, 0.5, 0.5]])),
        "a": (np.array([[0.0, 0.2, 0.4, 0.6], [1.0, 1.0, 0.0, 0.0]]), np.array([[1.0] * 4, [0.0] * 4])),
    }
    scores, objects = summarize(per_sequence)
    assert [o.name for o in objects] == ["a_1", "a_2", "b_1"]
    j_means = [0.3, 0.5, 1.0]
    f_means = [1.0, 0.0, 0.5]
    assert scores["J-Mean"] == pytest.approx(np.mean(j_means))
    assert scores["F-Mean"] == pytest.approx(np.mean(f_means))
    assert scores["J&F-Mean"] == pytest.approx((np.mean(j_means) + np.mean(f_means)) / 2)
    assert scores["J-Recall"] == pytest.approx(np.mean([0.25, 0.5, 1.0]))
    # 4 frames: bins [0,1] and [2,3] -> a_1: 0.1 - 0.5, a_2: 1 - 0, b_1: 0
    assert scores["J-Decay"] == pytest.approx(np.mean([-0.4, 1.0, 0.0]))
    assert scores["F-Recall"] == pytest.approx(np.mean([1.0, 0.0, 0.0]))
    with pytest.raises(ValueError, match="no object"):
        summarize({})
