"""Semantic segmentation data for the segmentation evaluator: Pascal VOC 2012 and ADE20K folders, checked.

Layouts (``dataset="auto"`` recognises either, in ``data_dir`` itself or in its ``VOCdevkit/VOC2012``,
``VOC2012`` or ``ADEChallengeData2016`` sub-folder)::

    VOC 2012:  JPEGImages/<id>.jpg, SegmentationClass/<id>.png, ImageSets/Segmentation/{train,val}.txt
    ADE20K:    images/{training,validation}/<stem>.jpg, annotations/{training,validation}/<stem>.png

Masks are palette (``P``) or grayscale (``L``) PNGs whose pixel values are class indices. VOC: value = class
(21 classes, 255 = void, ignored). ADE20K: 0 = "other" (ignored), 1..150 -> classes 0..149 (mmseg's
``reduce_zero_label``). Labels handed to the model are uint8 with :data:`IGNORE_INDEX` (255) for ignored pixels.

:meth:`SegmentationDataModule.setup` checks the folders, split files and that every listed image has its mask, and
opens the headers (mode, size) of up to :data:`HEADER_CHECK_LIMIT` pairs per split; every sample is checked again
when loaded (mode, size, label range), so a bad file in a large set is still reported by path. Finding and checking
the layouts and encoding the labels live in :mod:`evaluators.segmentation.layouts` (re-exported here).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from dora_lightning.evaluation.contract import EvaluationDataError
from dora_lightning.evaluation.image_data import load_rgb
from dora_lightning.evaluation.samplers import unrepeated_sampler
from dora_lightning.imagenet import IMAGENET_MEAN, IMAGENET_STD
from dora_lightning.sizes import short_side_size
from evaluators.segmentation.layouts import (
    HEADER_CHECK_LIMIT,
    IGNORE_INDEX,
    LAYOUT_CLASSES,
    VOC_CLASS_NAMES,
    SegSample,
    check_headers,
    check_pair,
    class_names,
    encode_labels,
    resolve_layout,
    scan_ade20k,
    scan_voc,
)

__all__ = [
    "HEADER_CHECK_LIMIT",
    "IGNORE_INDEX",
    "LAYOUT_CLASSES",
    "VOC_CLASS_NAMES",
    "SegSample",
    "SegmentationDataModule",
    "SegmentationDataset",
    "check_headers",
    "check_pair",
    "class_names",
    "collate_list",
    "encode_labels",
    "eval_size",
    "read_sample",
    "resolve_layout",
    "scan_ade20k",
    "scan_voc",
]


# ------------------------------------------------------------------------------------------------ samples
def read_sample(sample: SegSample, num_classes: int, reduce_zero_label: bool) -> tuple[Tensor, Tensor]:
    """Decode and check one pair: (image uint8 (3, H, W), labels uint8 (H, W)); errors name the file."""
    image = load_rgb(sample.image)
    try:
        with Image.open(sample.mask) as mask:
            check_pair(sample, image.size, mask.mode, mask.size)
            raw = np.array(mask)  # palette images decode to their indices
    except OSError as err:
        raise EvaluationDataError(f"cannot read mask '{sample.mask}': {type(err).__name__}: {err}") from err
    labels = encode_labels(raw, num_classes, reduce_zero_label, sample.mask)
    return v2.functional.pil_to_tensor(image), torch.from_numpy(labels)


def eval_size(height: int, width: int, image_size: int, patch_size: int) -> tuple[int, int]:
    """Evaluation input size: short side ``image_size``, long side scaled alike and rounded to the patch size."""
    new_width, new_height = short_side_size(width, height, image_size, multiple=patch_size)
    return (image_size, new_width) if height <= width else (new_height, image_size)


class SegmentationDataset(Dataset):
    """Checked image/mask pairs with a training or evaluation transform.

    ``train=True``: RandomResizedCrop(image_size, scale=crop_scale) + horizontal flip, drawn once and applied to the
    image (bilinear) and the mask (nearest) alike; yields (image (3, S, S) float, labels (S, S) uint8).
    ``train=False``: the image resized to :func:`eval_size` (bilinear, antialiased) and the labels at the original
    size; yields (image (3, h, w) float, labels (H, W) uint8). Images are normalised with ImageNet's mean and std.
    """

    def __init__(
        self,
        samples: Sequence[SegSample],
        num_classes: int,
        reduce_zero_label: bool,
        image_size: int,
        patch_size: int,
        train: bool,
        crop_scale: tuple[float, float] = (0.25, 1.0),
    ) -> None:
        self.samples = list(samples)
        self.num_classes = int(num_classes)
        self.reduce_zero_label = bool(reduce_zero_label)
        self.image_size = int(image_size)
        self.patch_size = int(patch_size)
        self.train = bool(train)
        self.normalize = v2.Compose(
            [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
        )
        self.augment = v2.Compose(
            [
                v2.RandomResizedCrop(self.image_size, scale=tuple(crop_scale), antialias=True),
                v2.RandomHorizontalFlip(),
            ]
        )

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        image, labels = read_sample(self.samples[index], self.num_classes, self.reduce_zero_label)
        if self.train:
            image, mask = self.augment(tv_tensors.Image(image), tv_tensors.Mask(labels))
            return self.normalize(image).as_subclass(Tensor), mask.as_subclass(Tensor)
        size = eval_size(image.shape[-2], image.shape[-1], self.image_size, self.patch_size)
        resized = v2.functional.resize(
            image, list(size), interpolation=v2.InterpolationMode.BILINEAR, antialias=True
        )
        return self.normalize(resized), labels


def collate_list(batch: Sequence[tuple[Tensor, Tensor]]) -> tuple[list[Tensor], list[Tensor]]:
    """Validation batches as lists: images and masks keep their own sizes."""
    return [image for image, _ in batch], [labels for _, labels in batch]


class SegmentationDataModule(pl.LightningDataModule):
    """VOC 2012 or ADE20K train/val splits for the segmentation evaluator; see the module docstring for layouts.

    Args:
        root: ``data_dir`` (the layout's folder, or a folder holding it as ``VOCdevkit/VOC2012``, ``VOC2012`` or
            ``ADEChallengeData2016``).
        dataset: ``auto`` (recognise the layout), ``voc`` or ``ade20k``.
        num_classes: classes of the labels; default 21 (VOC) or 150 (ADE20K). A mask value beyond it is an error.
        image_size: training crop side, and short side of the evaluation input (a multiple of ``patch_size``).
        patch_size: the backbone's patch size; evaluation sides are rounded to it.
        batch_size: images per batch per process (training and validation).
        num_workers: dataloader worker processes.
        crop_scale: RandomResizedCrop's area range for training crops.
    """

    def __init__(
        self,
        root: str,
        dataset: Literal["auto", "voc", "ade20k"] = "auto",
        num_classes: int | None = None,
        image_size: int = 512,
        patch_size: int = 16,
        batch_size: int = 16,
        num_workers: int = 2,
        crop_scale: tuple[float, float] = (0.25, 1.0),
    ) -> None:
        super().__init__()
        if image_size < 1 or patch_size < 1 or image_size % patch_size:
            raise ValueError(
                f"image_size {image_size} must be a positive multiple of the patch size {patch_size}"
            )
        if num_classes is not None and not 2 <= num_classes <= 255:
            raise ValueError(f"num_classes must be in 2..255 (255 marks ignored pixels), got {num_classes}")
        low, high = (float(v) for v in crop_scale)
        if not 0 < low <= high <= 1:
            raise ValueError(
                f"crop_scale must be (low, high) with 0 < low <= high <= 1, got {tuple(crop_scale)}"
            )
        self.root = Path(root)
        self.dataset = dataset
        self.requested_classes = num_classes
        self.image_size, self.patch_size = int(image_size), int(patch_size)
        self.batch_size, self.num_workers = int(batch_size), int(num_workers)
        self.crop_scale = (low, high)
        self.layout: str | None = None
        self.data_root: Path | None = None
        self.train_dataset: SegmentationDataset | None = None
        self.val_dataset: SegmentationDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        """Find and check the layout (once) and build the datasets; raises
        :class:`~dora_lightning.evaluation.contract.EvaluationDataError` (a ``ValueError``) naming what is wrong."""
        if self.layout is not None:
            return
        layout, data_root = resolve_layout(self.root, self.dataset)
        splits = scan_voc(data_root) if layout == "voc" else scan_ade20k(data_root)
        for samples in splits.values():
            check_headers(samples, HEADER_CHECK_LIMIT)
        num_classes = self.requested_classes or LAYOUT_CLASSES[layout]
        common = dict(
            num_classes=num_classes,
            reduce_zero_label=layout == "ade20k",
            image_size=self.image_size,
            patch_size=self.patch_size,
        )
        self.train_dataset = SegmentationDataset(
            splits["train"], train=True, crop_scale=self.crop_scale, **common
        )
        self.val_dataset = SegmentationDataset(splits["val"], train=False, **common)
        self.layout, self.data_root = layout, data_root

    @property
    def num_classes(self) -> int:
        self.setup()
        assert self.train_dataset is not None
        return self.train_dataset.num_classes

    @property
    def class_names(self) -> list[str]:
        """One name per class (VOC names, ADE20K's objectInfo150.txt, else the indices)."""
        self.setup()
        assert self.layout is not None and self.data_root is not None
        return class_names(self.layout, self.data_root, self.num_classes)

    def _loader(self, dataset: Dataset | None, **kwargs: Any) -> DataLoader:
        assert dataset is not None
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            **kwargs,
        )

    def train_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.train_dataset, shuffle=True, persistent_workers=self.num_workers > 0)

    def val_dataloader(self, rank: int = 0, world_size: int = 1) -> DataLoader:
        """Validation batches (lists, see :func:`collate_list`); with ``world_size`` > 1, this rank's share of the
        images, each image in exactly one share (no padding repeats, so metrics count every image once)."""
        self.setup()
        assert self.val_dataset is not None
        sampler = unrepeated_sampler(self.val_dataset, rank, world_size)
        return self._loader(self.val_dataset, shuffle=False, sampler=sampler, collate_fn=collate_list)
