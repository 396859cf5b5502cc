"""The clip plan: shard coverage, determinism, batch diversity against uniform draws (pure index arithmetic)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dora_lightning.data.sampling import (
    ClipSpec,
    Run,
    clips_per_shard,
    cursor_order,
    distinct_moments,
    mean_pairwise_gap,
    plan_shard,
)


def all_plans(num_starts, num_shards, epoch=0, seed=0, workers_per_rank=1, **kw):
    spec = ClipSpec(kw.pop("clip_length", 8), kw.pop("frame_stride", 60))
    options = dict(batch_size=4, cursors=8, start_step=4) | kw
    return [
        plan_shard(
            num_starts,
            spec,
            shard=s,
            num_shards=num_shards,
            workers_per_rank=workers_per_rank,
            seed=seed,
            epoch=epoch,
            **options,
        )
        for s in range(num_shards)
    ]


def emitted(plans):
    return [(int(v), int(s)) for p in plans for v, s in zip(p.videos, p.starts, strict=True)]


def batches(plan, batch_size):
    videos = plan.videos
    return [
        (videos[i : i + batch_size], plan.starts[i : i + batch_size]) for i in range(0, len(plan), batch_size)
    ]


def test_clip_spec_geometry():
    spec = ClipSpec(8, 60)
    assert spec.span == 421
    assert spec.frames(10).tolist() == [10 + 60 * j for j in range(8)]
    assert spec.num_starts(421) == 1 and spec.num_starts(420) == 0 and spec.num_starts(10_000) == 9580
    with pytest.raises(ValueError, match="data.frame_stride"):
        ClipSpec(8, 0)


def test_run_starts_follow_the_step():
    run = Run(0, 3, 20, 4)
    assert run.starts().tolist() == [3, 7, 11, 15, 19] and len(run) == 5
    assert len(Run(1, 0, 10)) == 10


def test_distinct_moments_groups_starts_within_a_span():
    span = 31
    assert distinct_moments([0, 0, 0], [0, 31, 62], span) == 1  # each within one span of the next: one chain
    assert distinct_moments([0, 0, 0], [0, 32, 64], span) == 3
    assert distinct_moments([0, 1], [5, 5], span) == 2  # other video, other moment
    assert distinct_moments([0, 0, 0, 0], [500, 0, 10, 480], span) == 2  # order does not matter
    assert distinct_moments([], [], span) == 0
    assert mean_pairwise_gap([0, 0, 0], [0, 10, 30]) == pytest.approx((10 + 30 + 20) / 3)
    assert math.isnan(mean_pairwise_gap([0, 1], [0, 10]))  # no pair of one video


@pytest.mark.parametrize(
    ("num_starts", "num_shards", "workers", "batch", "cursors", "step"),
    [
        ([5000, 1234, 777], 6, 3, 4, 8, 4),
        ([1003], 4, 2, 2, 4, 3),
        ([50], 4, 2, 2, 8, 1),
        ([20_000], 1, 1, 6, 12, 6),
    ],
)
def test_shards_cover_every_start_once(num_starts, num_shards, workers, batch, cursors, step):
    plans = all_plans(
        num_starts, num_shards, workers_per_rank=workers, batch_size=batch, cursors=cursors, start_step=step
    )
    clips = emitted(plans)
    assert len(clips) == len(set(clips)), "a start was emitted twice"
    total = sum(num_starts)
    assert {len(p) for p in plans} == {clips_per_shard(num_starts, num_shards, batch)}
    assert len(plans[0]) % batch == 0
    assert total - len(clips) < num_shards * batch
    assert set(clips) <= {(v, s) for v, n in enumerate(num_starts) for s in range(n)}
    for plan in plans:  # every clip lies on its run's lattice of starts, and a run never leaves its video
        for r, start in zip(plan.run_index.tolist(), plan.starts.tolist(), strict=True):
            run = plan.runs[r]
            assert run.start <= start < run.stop and (start - run.start) % step == 0
            assert run.stop <= num_starts[run.video]


def test_every_start_once_when_the_shards_divide_it():
    """2 ranks x 2 workers, batch 5, 4 x 5 x 600 starts: nothing is left out, every start exactly once."""
    plans = all_plans([6000, 6000], 4, workers_per_rank=2, batch_size=5, cursors=10, start_step=4)
    assert sorted(emitted(plans)) == [(v, s) for v in range(2) for s in range(6000)]


def test_dropped_remainder_rotates_over_epochs():
    seen = set()
    for epoch in range(6):
        seen |= set(emitted(all_plans([1003], 4, epoch=epoch, batch_size=2, cursors=4, start_step=3)))
    assert len(seen) == 1003


def test_same_seed_same_plan_and_epochs_differ():
    a = all_plans([30_000], 2, epoch=1, seed=7)
    b = all_plans([30_000], 2, epoch=1, seed=7)
    c = all_plans([30_000], 2, epoch=2, seed=7)
    d = all_plans([30_000], 2, epoch=1, seed=8)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x.starts, y.starts)
        np.testing.assert_array_equal(x.run_index, y.run_index)
        assert x.runs == y.runs
    assert not np.array_equal(a[0].starts, c[0].starts)
    assert not np.array_equal(a[0].starts, d[0].starts)


def test_a_cursor_takes_one_residue_and_moves_forward():
    """The frames a cursor holds are every start_step-th frame: all its starts in a run share one residue; its
    clips come in increasing order within a run, start_step apart."""
    (plan,) = all_plans([40_000], 1, batch_size=4, cursors=8, start_step=4)
    for cursor in range(8):
        mine = plan.cursor == cursor
        for r in np.unique(plan.run_index[mine]).tolist():
            starts = plan.starts[mine & (plan.run_index == r)]
            assert np.all(np.diff(starts) == 4)


def test_consecutive_batches_of_a_worker_use_other_cursors():
    (plan,) = all_plans([40_000], 1, batch_size=4, cursors=8)
    cursors = plan.cursor.reshape(-1, 4)
    for a, b in zip(cursors[:-1], cursors[1:], strict=True):
        assert len(set(a.tolist())) == 4 and not set(a.tolist()) & set(b.tolist())


def test_cursor_order_spreads_or_blocks_the_sets():
    # wide spacing: sets of every other cursor
    assert cursor_order(8, 4, worker_spacing=1000.0, span=421).tolist() == [0, 2, 4, 6, 1, 3, 5, 7]
    # cursors 12 starts apart, span 31: blocks of 2 neighbours, blocks 36 apart within a set
    assert cursor_order(8, 4, worker_spacing=12.0, span=31).tolist() == [0, 1, 4, 5, 2, 3, 6, 7]


def test_wt_scale_batches_beat_uniform_draws():
    """configs/wt.yaml at 8 GPUs x 8 workers on a 90-min 60 fps video, batch 16 (index arithmetic over the plan):
    every batch of rank 0 holds >= 15 distinct moments (median), never < 12; 10 consecutive batches of the rank hold
    >= 144; pairwise time gaps at least 0.9 x those of uniform draws."""
    spec = ClipSpec(8, 60)
    num_starts = [spec.num_starts(324_000)]
    plans = [
        plan_shard(
            num_starts,
            spec,
            shard=w,
            num_shards=64,
            workers_per_rank=8,
            batch_size=16,
            cursors=32,
            start_step=4,
            seed=0,
            epoch=3,
        )
        for w in range(8)
    ]
    per_worker = [batches(p, 16) for p in plans]
    moments = [distinct_moments(v, s, spec.span) for worker in per_worker for v, s in worker]
    gaps = [mean_pairwise_gap(v, s) for worker in per_worker for v, s in worker]
    rank_batches = [b for group in zip(*per_worker, strict=True) for b in group]  # rank batch n: worker n % 8
    windows = [
        distinct_moments(
            np.concatenate([v for v, _ in rank_batches[i : i + 10]]),
            np.concatenate([s for _, s in rank_batches[i : i + 10]]),
            spec.span,
        )
        for i in range(0, len(rank_batches) - 10, 7)
    ]
    rng = np.random.default_rng(0)
    uniform_gap = np.mean(
        [mean_pairwise_gap(np.zeros(16), rng.integers(0, num_starts[0], 16)) for _ in range(2000)]
    )
    assert np.median(moments) >= 15 and min(moments) >= 12
    assert min(windows) >= 144
    assert np.mean(gaps) >= 0.9 * uniform_gap


@pytest.mark.parametrize(("batch", "least"), [(8, 6), (32, 9)])
def test_demo_batches_match_uniform_draws(batch, least):
    """configs/demo.yaml on the bundled video (795 frames, clip_length 4, stride 10, 2 workers)."""
    spec = ClipSpec(4, 10)
    num_starts = [spec.num_starts(795)]
    plans = all_plans(
        num_starts,
        2,
        workers_per_rank=2,
        clip_length=4,
        frame_stride=10,
        batch_size=batch,
        cursors=2 * batch,
        start_step=2,
    )
    moments = [distinct_moments(v, s, spec.span) for p in plans for v, s in batches(p, batch)]
    assert np.median(moments) >= least
