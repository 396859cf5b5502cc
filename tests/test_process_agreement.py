"""The processes of a multi-process run agree on what they found before training: the same videos, the same
starting step; a difference is refused on every process (distributed.process_zero_value_if_any_differs)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from conftest import BUNDLED_VIDEO, MICRO_MODULE

from dora_lightning.data.augment.multicrop import ClipMultiCrop
from dora_lightning.data.datamodule import VideoClipDataModule
from dora_lightning.distributed import process_zero_value_if_any_differs
from dora_lightning.module import DoRAModule


class TwoProcesses:
    """This process is process 1 of 2; process 0 holds ``zero``; the collectives are answered as DDP would."""

    world_size = 2

    def __init__(self, zero) -> None:
        self.zero, self.decisions = zero, []

    def broadcast(self, value, src=0):
        assert src == 0
        return self.zero

    def reduce_boolean_decision(self, decision, all=True):
        assert all is False  # any process differing counts
        self.decisions.append(decision)
        return decision


def test_one_process_or_the_same_values_agree_and_a_difference_is_reported_everywhere():
    assert process_zero_value_if_any_differs(SimpleNamespace(world_size=1), 3) is None
    same = TwoProcesses(zero=[1, 2])
    assert process_zero_value_if_any_differs(same, [1, 2]) is None and same.decisions == [False]
    other = TwoProcesses(zero=[1, 2])
    assert process_zero_value_if_any_differs(other, [1, 3]) == [1, 2] and other.decisions == [True]


def _data_module() -> VideoClipDataModule:
    transform = ClipMultiCrop(global_size=32, local_size=16, num_local_crops=2, pre_crop_size=48)
    options = dict(clip_length=2, frame_stride=10, decode_short_side=48, batch_size=2, num_workers=0)
    return VideoClipDataModule(paths=str(BUNDLED_VIDEO), transform=transform, **options)


def test_processes_that_find_other_videos_are_refused(tmp_path):
    """A node without the files, or with a copy still being written: process 0 found another video list."""
    dm = _data_module()
    dm.trainer = SimpleNamespace(
        strategy=TwoProcesses(zero=[["vtest.mp4", 123, 795], ["other.mp4", 9, 600]]),
        global_rank=1,
        world_size=2,
    )
    with pytest.raises(
        ValueError, match="data.paths: the processes of this run do not find the same videos"
    ) as err:
        dm.setup("fit")
    assert "process 0 has 2 videos, 1,395 frames in all (vtest.mp4, other.mp4)" in str(err.value)
    assert "process 1 1 video, 795 frames in all (vtest.mp4)" in str(err.value)


def test_processes_that_find_the_same_videos_set_up():
    dm = _data_module()
    probe = _data_module()
    probe.setup("fit")
    found = [
        [*row, video.num_frames] for row, video in zip(probe.identity()["videos"], probe.videos, strict=True)
    ]
    dm.trainer = SimpleNamespace(strategy=TwoProcesses(zero=found), global_rank=1, world_size=2)
    dm.setup("fit")
    assert dm.dataset is not None and dm.trainer.strategy.decisions == [False]


def test_processes_that_resume_from_different_steps_are_refused():
    """--ckpt_path last resolved in each node's own run folder: a node that found none would start fresh."""
    module = DoRAModule(**MICRO_MODULE)
    module._trainer = SimpleNamespace(
        strategy=TwoProcesses(zero=(500, 3)), global_step=0, current_epoch=0, global_rank=1, world_size=2
    )
    with pytest.raises(
        ValueError, match=r"start from different checkpoints \(process 0 at step 500, process 1 at step 0\)"
    ):
        module.on_train_start()
    module._trainer.strategy = TwoProcesses(zero=(0, 0))
    module._step_values = (7, {"lr": 1.0})
    module.on_train_start()  # the same step everywhere: no error
    assert module._step_values is None  # and TrainingDiagnostics' start still runs (a fresh schedule cache)
