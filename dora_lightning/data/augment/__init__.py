"""The clip augmentation's room: the random draws of a clip's views (:mod:`.plan`) and their rendering on the training
device, batched over the clips of a batch (:mod:`.device`); see docs/data.md, "Augmentation on the GPU"."""

from dora_lightning.data.augment.plan import PLAN_PREFIX, FramesAndPlan, ViewPlan

__all__ = ["PLAN_PREFIX", "FramesAndPlan", "ViewPlan"]
