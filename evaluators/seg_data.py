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
when loaded (mode, size, label range), so a bad file in a large set is still reported by path.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from evaluators.image_data import IMAGENET_MEAN, IMAGENET_STD, load_rgb

__all__ = [
    "HEADER_CHECK_LIMIT",
    "IGNORE_INDEX",
    "LAYOUT_CLASSES",
    "SegSample",
    "SegmentationDataModule",
    "SegmentationDataset",
    "encode_labels",
    "eval_size",
    "resolve_layout",
    "scan_ade20k",
    "scan_voc",
]

IGNORE_INDEX = 255
LAYOUT_CLASSES = {"voc": 21, "ade20k": 150}
# pairs per split whose headers setup() opens; every sample is checked again when loaded
HEADER_CHECK_LIMIT = 500
VOC_CLASS_NAMES = (
    "background aeroplane bicycle bird boat bottle bus car cat chair cow diningtable dog horse motorbike person "
    "pottedplant sheep sofa train tvmonitor"
).split()
_SUBFOLDERS = {"voc": ("VOCdevkit/VOC2012", "VOC2012"), "ade20k": ("ADEChallengeData2016",)}
_VOC_LAYOUT = (
    "a Pascal VOC 2012 folder holds JPEGImages/, SegmentationClass/ and ImageSets/Segmentation/{train,val}.txt "
    "(unpack VOCtrainval_11-May-2012.tar and point data_dir at VOCdevkit/VOC2012)"
)
_ADE_LAYOUT = (
    "an ADE20K folder holds images/{training,validation}/*.jpg and annotations/{training,validation}/*.png "
    "(unpack ADEChallengeData2016.zip and point data_dir at ADEChallengeData2016)"
)
_ADE_SPLITS = {"train": "training", "val": "validation"}
_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


@dataclass(frozen=True)
class SegSample:
    """One image and its mask (paths as strings)."""

    image: str
    mask: str


# ------------------------------------------------------------------------------------------------ layouts
def _looks_like(kind: str, folder: Path) -> bool:
    names = ("JPEGImages", "SegmentationClass", "ImageSets") if kind == "voc" else ("images", "annotations")
    return any((folder / name).is_dir() for name in names)


def resolve_layout(root: str | Path, dataset: Literal["auto", "voc", "ade20k"] = "auto") -> tuple[str, Path]:
    """The layout (``"voc"`` or ``"ade20k"``) and the folder holding it, given ``data_dir`` and ``dataset``.

    The folder is ``root`` or, when ``root`` does not look like the layout, its known sub-folder that does.
    """
    root = Path(root)
    if dataset not in ("auto", "voc", "ade20k"):
        raise ValueError(f"dataset must be 'auto', 'voc' or 'ade20k', got {dataset!r}")
    if not root.is_dir():
        raise ValueError(
            f"data folder '{root}' does not exist or is not a folder; {_VOC_LAYOUT}; {_ADE_LAYOUT}"
        )
    kinds = ("voc", "ade20k") if dataset == "auto" else (dataset,)
    here = [kind for kind in kinds if _looks_like(kind, root)]
    if len(here) > 1:
        raise ValueError(
            f"'{root}' holds both VOC (JPEGImages/...) and ADE20K (images/, annotations/) folders; "
            "choose one with dataset='voc' or dataset='ade20k'"
        )
    if here:
        return here[0], root
    for kind in kinds:
        for sub in _SUBFOLDERS[kind]:
            if _looks_like(kind, root / sub):
                return kind, root / sub
    if dataset == "auto":
        raise ValueError(f"'{root}' is neither a VOC nor an ADE20K folder: {_VOC_LAYOUT}; {_ADE_LAYOUT}")
    return dataset, root  # the scan names what is missing


def _read_ids(split_file: Path) -> list[str]:
    if not split_file.is_file():
        raise ValueError(f"split file '{split_file}' is missing; {_VOC_LAYOUT}")
    ids = [line.split()[0] for line in split_file.read_text().splitlines() if line.strip()]
    if not ids:
        raise ValueError(f"split file '{split_file}' lists no image ids; it needs one id per line")
    return ids


def scan_voc(root: Path) -> dict[str, list[SegSample]]:
    """``{"train": [...], "val": [...]}`` of a VOC 2012 folder, in split-file order, every file checked to exist."""
    images, masks, sets = root / "JPEGImages", root / "SegmentationClass", root / "ImageSets" / "Segmentation"
    for folder in (images, masks, sets):
        if not folder.is_dir():
            raise ValueError(f"'{folder}' is missing; {_VOC_LAYOUT}")
    image_files, mask_files = set(os.listdir(images)), set(os.listdir(masks))
    splits: dict[str, list[SegSample]] = {}
    for split in ("train", "val"):
        split_file = sets / f"{split}.txt"
        samples = []
        for image_id in _read_ids(split_file):
            for folder, files, name in ((images, image_files, "image"), (masks, mask_files, "mask")):
                filename = f"{image_id}.{'jpg' if name == 'image' else 'png'}"
                if filename not in files:
                    raise ValueError(
                        f"'{split_file}' lists '{image_id}' but its {name} '{folder / filename}' does not exist; "
                        "restore the file or remove the id from the split file"
                    )
            samples.append(SegSample(str(images / f"{image_id}.jpg"), str(masks / f"{image_id}.png")))
        splits[split] = samples
    return splits


def _stems(folder: Path, extensions: Sequence[str]) -> dict[str, str]:
    found = {}
    for name in os.listdir(folder):
        stem, ext = os.path.splitext(name)
        if not name.startswith(".") and ext.lower() in extensions:
            found[stem] = name
    return found


def scan_ade20k(root: Path) -> dict[str, list[SegSample]]:
    """``{"train": [...], "val": [...]}`` of an ADEChallengeData2016 folder, sorted by file name, paired by stem."""
    splits: dict[str, list[SegSample]] = {}
    for split, folder_name in _ADE_SPLITS.items():
        image_dir, mask_dir = root / "images" / folder_name, root / "annotations" / folder_name
        for folder in (image_dir, mask_dir):
            if not folder.is_dir():
                raise ValueError(f"'{folder}' is missing; {_ADE_LAYOUT}")
        images, masks = _stems(image_dir, _IMAGE_EXTENSIONS), _stems(mask_dir, (".png",))
        if not images:
            raise ValueError(f"'{image_dir}' holds no images (.jpg); {_ADE_LAYOUT}")
        for stem in sorted(images):
            if stem not in masks:
                raise ValueError(
                    f"image '{image_dir / images[stem]}' has no annotation '{mask_dir / (stem + '.png')}'; "
                    "every image needs a mask of the same name"
                )
        for stem in sorted(masks):
            if stem not in images:
                raise ValueError(
                    f"annotation '{mask_dir / masks[stem]}' has no image '{image_dir / (stem + '.jpg')}'; "
                    "remove the stray annotation or restore its image"
                )
        splits[split] = [
            SegSample(str(image_dir / images[stem]), str(mask_dir / masks[stem])) for stem in sorted(images)
        ]
    return splits


def class_names(kind: str, root: Path, num_classes: int) -> list[str]:
    """Class names: VOC's 21 names, ADE20K's from ``objectInfo150.txt`` when present, else the indices."""
    if kind == "voc" and num_classes == len(VOC_CLASS_NAMES):
        return list(VOC_CLASS_NAMES)
    info = root / "objectInfo150.txt"
    if kind == "ade20k" and info.is_file():
        rows = [line.split("\t") for line in info.read_text().splitlines()[1:] if line.strip()]
        names = [row[-1].strip() for row in rows]
        if len(names) == num_classes:
            return names
    return [str(i) for i in range(num_classes)]


# ------------------------------------------------------------------------------------------------ samples
def _header(path: str) -> tuple[str, tuple[int, int]]:
    try:
        with Image.open(path) as image:  # reads the header only
            return image.mode, image.size
    except Exception as err:  # PIL raises several kinds
        raise ValueError(f"cannot read '{path}': {type(err).__name__}: {err}") from err


def check_pair(
    sample: SegSample, image_size: tuple[int, int], mask_mode: str, mask_size: tuple[int, int]
) -> None:
    """Refuse a mask that is not a palette (``P``) or 8-bit grayscale (``L``) image, or whose size (PIL
    (width, height)) differs from its image's."""
    if mask_mode not in ("P", "L"):
        raise ValueError(
            f"mask '{sample.mask}' has PIL mode {mask_mode!r}; expected a palette (P) or 8-bit grayscale (L) PNG "
            "whose pixel values are class indices (convert colour masks to class indices first)"
        )
    if image_size != mask_size:
        raise ValueError(
            f"image '{sample.image}' is {image_size[0]}x{image_size[1]} but its mask '{sample.mask}' is "
            f"{mask_size[0]}x{mask_size[1]}; an image and its mask must have the same size"
        )


def check_headers(samples: Sequence[SegSample], limit: int = HEADER_CHECK_LIMIT) -> None:
    """Open the headers of ``limit`` evenly spaced pairs (all when fewer): mask mode and image/mask sizes."""
    count = len(samples)
    picks = range(count) if count <= limit else np.linspace(0, count - 1, limit).round().astype(int)
    for index in sorted(set(int(i) for i in picks)):
        sample = samples[index]
        check_pair(sample, _header(sample.image)[1], *_header(sample.mask))


def encode_labels(raw: np.ndarray, num_classes: int, reduce_zero_label: bool, path: str) -> np.ndarray:
    """Mask pixel values -> uint8 labels in ``0..num_classes-1`` or :data:`IGNORE_INDEX`; refuses values out of range.

    Without ``reduce_zero_label`` (VOC) a value is its class and 255 is void. With it (ADE20K) 0 ("other") and 255
    are ignored and ``v`` becomes ``v - 1``.
    """
    raw = np.asarray(raw, dtype=np.uint8)
    top = num_classes if reduce_zero_label else num_classes - 1
    bad = np.unique(raw[(raw != IGNORE_INDEX) & (raw > top)])
    if bad.size:
        low, meaning = (1, "; 0 = other, ignored") if reduce_zero_label else (0, "")
        shown = ", ".join(str(v) for v in bad[:5]) + (" ..." if bad.size > 5 else "")
        raise ValueError(
            f"mask '{path}' holds label values {shown} outside {low}..{top} (255 = ignored{meaning}) for "
            f"num_classes={num_classes}; set num_classes to the data set's class count or fix the mask"
        )
    if not reduce_zero_label:
        return raw.copy()
    labels = raw - 1  # uint8: 0 wraps to 255 (ignored)
    labels[raw == IGNORE_INDEX] = IGNORE_INDEX
    return labels


def read_sample(sample: SegSample, num_classes: int, reduce_zero_label: bool) -> tuple[Tensor, Tensor]:
    """Decode and check one pair: (image uint8 (3, H, W), labels uint8 (H, W)); errors name the file."""
    image = load_rgb(sample.image)
    try:
        with Image.open(sample.mask) as mask:
            check_pair(sample, image.size, mask.mode, mask.size)
            raw = np.array(mask)  # palette images decode to their indices
    except OSError as err:
        raise ValueError(f"cannot read mask '{sample.mask}': {type(err).__name__}: {err}") from err
    labels = encode_labels(raw, num_classes, reduce_zero_label, sample.mask)
    return v2.functional.pil_to_tensor(image), torch.from_numpy(labels)


def eval_size(height: int, width: int, image_size: int, patch_size: int) -> tuple[int, int]:
    """Evaluation input size: short side ``image_size``, long side scaled alike and rounded to the patch size."""
    scale = image_size / min(height, width)
    rounded = [max(patch_size, round(side * scale / patch_size) * patch_size) for side in (height, width)]
    short = 0 if height <= width else 1
    rounded[short] = image_size
    return rounded[0], rounded[1]


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
        """Find and check the layout (once) and build the datasets; raises ``ValueError`` naming what is wrong."""
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
        sampler = None
        if world_size > 1:
            sampler = UnrepeatedDistributedSampler(
                self.val_dataset, num_replicas=world_size, rank=rank, shuffle=False
            )
        return self._loader(self.val_dataset, shuffle=False, sampler=sampler, collate_fn=collate_list)
