"""Where ``ClipMultiCrop`` lived before the augmentation got its room (:mod:`dora_lightning.data.augment`): configs and
saved ``config.yaml`` files that name ``dora_lightning.data.transforms.ClipMultiCrop`` still parse."""

from dora_lightning.data.augment.multicrop import ClipMultiCrop

__all__ = ["ClipMultiCrop"]
