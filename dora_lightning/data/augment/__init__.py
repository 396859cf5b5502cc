"""The clip augmentation's room: DoRA's and DINO's multi-crop views of a clip.

* :mod:`.multicrop` - :class:`ClipMultiCrop`, the transform the configs name (its argument checks and recipes:
  :mod:`.multicrop_args`); :meth:`ClipMultiCrop.draw` makes a clip's random draws (:mod:`.plan`), ``render`` the views.
* :mod:`.crop_boxes` - the crop geometry; :mod:`.crops` - the ``roi_align`` call both renderers share.
* :mod:`.colour_ops` (jitter, grayscale, solarise as tensor ops and one colour map), :mod:`.colour_views` (applying them
  to groups of views), :mod:`.blur` (Gaussian blur), :mod:`.compiled` (the compiled CPU kernels of the colour map and
  the blur).
* :mod:`.device` and :mod:`.device_colour` - rendering the views on the training device, batched over the clips
  (``data.augment_on: gpu``); see docs/data.md, "Augmentation on the GPU".
"""

from dora_lightning.data.augment.multicrop import ClipMultiCrop
from dora_lightning.data.augment.plan import PLAN_PREFIX, FramesAndPlan, ViewPlan

__all__ = ["PLAN_PREFIX", "ClipMultiCrop", "FramesAndPlan", "ViewPlan"]
