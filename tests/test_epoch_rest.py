"""An epoch continued on other layouts (processes x workers x batch size): the starts the earlier layouts took are
replayed, the rest is dealt without them, no start is taken twice, and a checkpoint's data section is rebased or
refused in one line (pure index arithmetic)."""

from __future__ import annotations

import numpy as np
import pytest

from dora_lightning.data.epoch_rest import (
    EpochRest,
    Layout,
    Segment,
    batches_taken,
    consumed_starts,
    continue_epoch,
    rest_batches_available,
)
from dora_lightning.data.position import load_rest, rebase_position, save_rest
from dora_lightning.data.sampling import ClipSpec, distinct_moments

NUM_STARTS = [2400, 1451, 1333]
SPEC = ClipSpec(4, 20)
STEP = 4
EIGHT_BY_TWO = Layout(world_size=2, num_workers=3, batch_size=4, cursors=8)
ONE_BY_TWO = Layout(world_size=1, num_workers=2, batch_size=8, cursors=16)
FOUR_BY_ONE = Layout(world_size=4, num_workers=1, batch_size=2, cursors=4)
BASES = np.concatenate([[0], np.cumsum(NUM_STARTS)[:-1]])


def emitted(layout: Layout, batches: int, taken: np.ndarray | None = None, epoch: int = 0) -> list[list[int]]:
    """The batches (axis positions of their clips) each shard of ``layout`` emits when every process takes
    ``batches`` batches, from the starts not ``taken``."""
    out = []
    for shard in range(layout.num_shards):
        (plan,) = layout.plans(NUM_STARTS, SPEC, [shard], start_step=STEP, seed=7, epoch=epoch, exclude=taken)
        clips = batches_taken(batches, layout.num_workers, shard % layout.num_workers) * layout.batch_size
        positions = (BASES[plan.videos] + plan.starts)[:clips].tolist()
        out += [positions[i : i + layout.batch_size] for i in range(0, clips, layout.batch_size)]
    return out


def flat(batches: list[list[int]]) -> list[int]:
    return [p for batch in batches for p in batch]


def taken_by(*segments: Segment, epoch: int = 0) -> np.ndarray:
    return consumed_starts(NUM_STARTS, SPEC, segments, start_step=STEP, seed=7, epoch=epoch)


def test_batches_taken_follow_the_loaders_turns():
    # 7 batches over 3 workers: 0, 1, 2, 0, 1, 2, 0
    assert [batches_taken(7, 3, w) for w in range(3)] == [3, 2, 2]
    assert sum(batches_taken(11, 4, w) for w in range(4)) == 11


def test_replayed_starts_are_the_ones_the_layout_emitted():
    first = flat(emitted(EIGHT_BY_TWO, 5))
    assert len(first) == 5 * 4 * 2 == len(set(first))
    assert np.flatnonzero(taken_by(Segment(EIGHT_BY_TWO, 5))).tolist() == sorted(first)


def test_an_epoch_continued_on_two_other_layouts_takes_no_start_twice():
    """8-process-like layout for 5 batches, another for 3, a third for the rest: every start once at most, and all
    but less than one round of the last layout's batches are used."""
    first = flat(emitted(EIGHT_BY_TWO, 5))
    taken = taken_by(Segment(EIGHT_BY_TWO, 5))
    second = flat(emitted(ONE_BY_TWO, 3, taken))
    taken = taken_by(Segment(EIGHT_BY_TWO, 5), Segment(ONE_BY_TWO, 3))
    assert np.flatnonzero(taken).tolist() == sorted(first + second)
    rest = rest_batches_available(NUM_STARTS, taken, FOUR_BY_ONE)
    third = flat(emitted(FOUR_BY_ONE, rest, taken))
    everything = first + second + third
    assert len(everything) == len(set(everything))
    assert sum(NUM_STARTS) - len(everything) < FOUR_BY_ONE.num_shards * FOUR_BY_ONE.batch_size


def test_the_rest_of_an_epoch_keeps_batches_spread_over_the_videos():
    """A batch of the rest still holds clips of far-apart moments, as a batch of a whole epoch does."""
    taken = taken_by(Segment(EIGHT_BY_TWO, 20))
    videos = np.searchsorted(BASES, np.arange(sum(NUM_STARTS)), side="right") - 1
    for batches in (emitted(ONE_BY_TWO, 8), emitted(ONE_BY_TWO, 8, taken)):
        moments = [distinct_moments(videos[b], np.asarray(b) - BASES[videos[b]], SPEC.span) for b in batches]
        assert min(moments) == ONE_BY_TWO.batch_size


def test_continue_epoch_counts_the_taken_clips_in_this_layouts_batches():
    layout = Layout(1, 2, 8, 16)
    assert continue_epoch(40, 100, 50, layout, accumulate=1) == (5, 45)
    assert continue_epoch(40, 100, 50, layout, accumulate=2) == (6, 44)  # a whole optimiser step
    assert continue_epoch(40, 40, 50, layout, accumulate=1) == (10, 40)  # no more than the rest holds
    assert continue_epoch(3, 100, 50, layout, accumulate=1) == (1, 49)  # a clip taken: at least one batch
    assert continue_epoch(400, 0, 50, layout, accumulate=1) == (50, 0)  # the whole epoch taken


def section(layout: Layout, batches: int, accumulate: int = 1, epoch: int = 2) -> dict:
    return {
        "epoch": epoch,
        "batches_done": batches,
        "seed": 7,
        "start_step": STEP,
        "world_size": layout.world_size,
        "num_workers": layout.num_workers,
        "batch_size": layout.batch_size,
        "cursors": layout.cursors,
        "accumulate_grad_batches": accumulate,
        "rest": None,
    }


def rebase(state: dict, layout: Layout, accumulate: int = 1, per_epoch: int = 300):
    return rebase_position(
        state,
        layout,
        accumulate,
        num_starts=NUM_STARTS,
        spec=SPEC,
        start_step=STEP,
        seed=7,
        batches_per_epoch=per_epoch,
    )


def test_a_checkpoint_of_this_layout_or_an_older_version_is_not_rebased():
    assert rebase(section(ONE_BY_TWO, 9), ONE_BY_TWO) is None
    older = section(EIGHT_BY_TWO, 9)
    del older["accumulate_grad_batches"]
    assert rebase(older, ONE_BY_TWO) is None  # load_state_dict refuses the other layout


def test_another_global_batch_is_refused_with_the_settings_that_keep_it():
    with pytest.raises(ValueError) as refused:
        rebase(section(EIGHT_BY_TWO, 9), Layout(1, 2, 4, 8))
    message = str(refused.value)
    assert "global batch of 8 clips (data.batch_size 4 x 2 processes x accumulate_grad_batches 1)" in message
    assert "this run's is 4 (4 x 1 x 1)" in message
    assert "--trainer.accumulate_grad_batches 2 or --data.batch_size 8" in message
    assert "--init_from" in message


def test_a_mid_epoch_checkpoint_is_rebased_to_the_rest_of_its_epoch():
    rebased = rebase(section(EIGHT_BY_TWO, 9), ONE_BY_TWO)
    state = rebased.state
    assert (state["world_size"], state["num_workers"], state["batch_size"]) == (1, 2, 8)
    assert state["epoch"] == 2 and state["batches_done"] == rebased.loop_batches == 9  # 72 clips, 8 a batch
    rest = load_rest(state["rest"])
    assert rest.start == 9 and rest.earlier == (Segment(EIGHT_BY_TWO, 9),) and rest.batches == 300 - 9
    assert "2 processes x 3 workers x batch 4 -> 1 process x 2 workers x batch 8" in rebased.notice
    assert "72 of 5184 taken" in rebased.notice and "not bit-exact" in rebased.notice
    # rebased again, mid-way through the rest, onto a third layout: both earlier parts are replayed
    again = rebase(state | {"batches_done": 9 + 4}, FOUR_BY_ONE, per_epoch=600)
    rest = load_rest(again.state["rest"])
    assert rest.earlier == (Segment(EIGHT_BY_TWO, 9), Segment(ONE_BY_TWO, 4))
    assert rest.start == again.loop_batches == round((72 + 4 * 8) / 8)


def test_a_checkpoint_at_an_epochs_start_keeps_lightnings_count():
    rebased = rebase(section(EIGHT_BY_TWO, 0, epoch=3), ONE_BY_TWO)
    assert rebased.loop_batches is None and rebased.state["epoch"] == 3 and rebased.state["rest"] is None


def test_rest_roundtrips_through_a_checkpoint():
    rest = EpochRest((Segment(EIGHT_BY_TWO, 9), Segment(ONE_BY_TWO, 4)), 120, 13)
    assert load_rest(save_rest(rest)) == rest
    assert load_rest(None) is None


def test_a_change_of_cursors_alone_is_said_as_one():
    """It read "batch 2 -> batch 2": the cursors are named when they are what changed."""
    assert EIGHT_BY_TWO.describe() == "2 processes x 3 workers x batch 4"
    assert EIGHT_BY_TWO.describe(cursors=True) == "2 processes x 3 workers x batch 4 x 8 cursors"
