"""The clip plan: shard coverage, determinism, interleaving and the shuffle buffer (pure index arithmetic)."""

from __future__ import annotations

import numpy as np
import pytest

from dora_lightning.data.sampling import (
    ClipSpec,
    Run,
    clips_per_shard,
    epoch_segments,
    interleave_order,
    plan_shard,
    shuffle_buffer_order,
    split_for_interleave,
)


def all_plans(num_starts, num_shards, epoch=0, seed=0, multiple_of=1, **kw):
    spec = ClipSpec(kw.pop("clip_length", 8), kw.pop("frame_stride", 60))
    options = dict(segment_length=500, interleave=3, shuffle_buffer=64) | kw
    return [
        plan_shard(
            num_starts,
            spec,
            shard=s,
            num_shards=num_shards,
            seed=seed,
            epoch=epoch,
            multiple_of=multiple_of,
            **options,
        )
        for s in range(num_shards)
    ]


def test_clip_spec_geometry():
    spec = ClipSpec(8, 60)
    assert spec.span == 421
    assert spec.frames(10).tolist() == [10 + 60 * j for j in range(8)]
    assert spec.num_starts(421) == 1 and spec.num_starts(420) == 0 and spec.num_starts(10_000) == 9580
    with pytest.raises(ValueError, match="data.frame_stride"):
        ClipSpec(8, 0)


@pytest.mark.parametrize("num_shards", [1, 2, 6])  # e.g. 2 ranks x 3 workers
def test_shards_cover_every_start_once(num_shards):
    num_starts = [5000, 1234, 777]
    plans = all_plans(num_starts, num_shards)
    emitted = [(p.runs[r].video, s) for p in plans for r, s in zip(p.run_index, p.starts, strict=True)]
    assert len(emitted) == len(set(emitted)), "a start was emitted twice"
    total = sum(num_starts)
    assert len(emitted) == total - total % num_shards
    everything = {(v, s) for v, n in enumerate(num_starts) for s in range(n)}
    assert set(emitted) <= everything
    assert {len(p) for p in plans} == {total // num_shards}


def test_shards_are_whole_batches_and_equal():
    plans = all_plans([1000, 333], 4, multiple_of=6)
    assert {len(p) for p in plans} == {clips_per_shard([1000, 333], 4, 6)}
    assert len(plans[0]) % 6 == 0


def test_same_seed_same_plan_and_epochs_differ():
    a = all_plans([3000], 2, epoch=1, seed=7)
    b = all_plans([3000], 2, epoch=1, seed=7)
    c = all_plans([3000], 2, epoch=2, seed=7)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x.starts, y.starts)
        np.testing.assert_array_equal(x.run_index, y.run_index)
    assert not np.array_equal(a[0].starts, c[0].starts)


def test_dropped_remainder_rotates_over_epochs():
    num_starts = [1003]
    seen = set()
    for epoch in range(6):
        plans = all_plans(num_starts, 4, epoch=epoch, segment_length=100)
        seen |= {int(s) for p in plans for s in p.starts}
    assert len(seen) == 1003


def test_segments_are_permuted_and_cover_videos():
    segments = epoch_segments([250, 100], segment_length=100, seed=0, epoch=0)
    assert sorted((s.video, s.start, s.stop) for s in segments) == [
        (0, 0, 100),
        (0, 100, 200),
        (0, 200, 250),
        (1, 0, 100),
    ]


def test_interleave_alternates_runs():
    runs = [Run(0, 0, 3), Run(0, 100, 102), Run(1, 50, 53)]
    run_index, starts = interleave_order(runs, interleave=2)
    assert run_index.tolist() == [0, 1, 0, 1, 0, 2, 2, 2]
    assert starts.tolist() == [0, 100, 1, 101, 2, 50, 51, 52]


def test_split_for_interleave_respects_minimum_length():
    pieces = split_for_interleave([Run(0, 0, 1000)], interleave=4, min_length=200)
    assert len(pieces) == 4 and sum(len(p) for p in pieces) == 1000
    assert split_for_interleave([Run(0, 0, 300)], interleave=4, min_length=200) == [Run(0, 0, 300)]


def test_shuffle_buffer_is_a_bounded_permutation():
    rng = np.random.default_rng(0)
    order = shuffle_buffer_order(1000, 32, rng)
    assert sorted(order.tolist()) == list(range(1000))
    assert not np.array_equal(order, np.arange(1000))
    # an item can leave the buffer only after it entered it: position p emits an item inserted before p + 32
    assert np.all(order[:-32] < np.arange(1000 - 32) + 32)
    np.testing.assert_array_equal(shuffle_buffer_order(50, 1, rng), np.arange(50))


def test_shuffle_buffer_mixes_distant_moments():
    """A batch should mix runs: with interleave and a buffer, consecutive clips rarely come from the same run."""
    plan = all_plans([20_000], 1, segment_length=2000, interleave=4, shuffle_buffer=256)[0]
    same_run = np.mean(plan.run_index[1:] == plan.run_index[:-1])
    assert same_run < 0.5
