"""Finding and checking the Pascal VOC 2012 and ADE20K folders of the segmentation evaluator, and label encoding.

Layouts (``dataset="auto"`` recognises either, in ``data_dir`` itself or in its ``VOCdevkit/VOC2012``,
``VOC2012`` or ``ADEChallengeData2016`` sub-folder)::

    VOC 2012:  JPEGImages/<id>.jpg, SegmentationClass/<id>.png, ImageSets/Segmentation/{train,val}.txt
    ADE20K:    images/{training,validation}/<stem>.jpg, annotations/{training,validation}/<stem>.png

:func:`resolve_layout` finds the layout, :func:`scan_voc` / :func:`scan_ade20k` list and pair the files of each split,
:func:`check_headers` / :func:`check_pair` refuse masks of the wrong mode or size, and :func:`encode_labels` maps mask
values to class indices (VOC: value = class, 255 void; ADE20K: 0 "other" ignored, ``v`` -> ``v - 1``). The data set
and data module built on them are in :mod:`evaluators.segmentation.data`. Data problems raise
:class:`~dora_lightning.evaluation.contract.EvaluationDataError` (a ``ValueError``; missing files and folders its ``FileNotFoundError``
subclass :class:`~dora_lightning.evaluation.contract.EvaluationDataNotFoundError`) naming the file and the fix.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from dora_lightning.evaluation.contract import EvaluationDataError, EvaluationDataNotFoundError
from dora_lightning.evaluation.images import image_header

__all__ = [
    "HEADER_CHECK_LIMIT",
    "IGNORE_INDEX",
    "LAYOUT_CLASSES",
    "VOC_CLASS_NAMES",
    "SegSample",
    "check_headers",
    "check_pair",
    "class_names",
    "encode_labels",
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
        raise EvaluationDataNotFoundError(
            f"data folder '{root}' does not exist or is not a folder; {_VOC_LAYOUT}; {_ADE_LAYOUT}"
        )
    kinds = ("voc", "ade20k") if dataset == "auto" else (dataset,)
    here = [kind for kind in kinds if _looks_like(kind, root)]
    if len(here) > 1:
        raise EvaluationDataError(
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
        raise EvaluationDataError(
            f"'{root}' is neither a VOC nor an ADE20K folder: {_VOC_LAYOUT}; {_ADE_LAYOUT}"
        )
    return dataset, root  # the scan names what is missing


def _read_ids(split_file: Path) -> list[str]:
    if not split_file.is_file():
        raise EvaluationDataNotFoundError(f"split file '{split_file}' is missing; {_VOC_LAYOUT}")
    ids = [line.split()[0] for line in split_file.read_text().splitlines() if line.strip()]
    if not ids:
        raise EvaluationDataError(f"split file '{split_file}' lists no image ids; it needs one id per line")
    return ids


def scan_voc(root: Path) -> dict[str, list[SegSample]]:
    """``{"train": [...], "val": [...]}`` of a VOC 2012 folder, in split-file order, every file checked to exist."""
    images, masks, sets = root / "JPEGImages", root / "SegmentationClass", root / "ImageSets" / "Segmentation"
    for folder in (images, masks, sets):
        if not folder.is_dir():
            raise EvaluationDataNotFoundError(f"'{folder}' is missing; {_VOC_LAYOUT}")
    image_files, mask_files = set(os.listdir(images)), set(os.listdir(masks))
    splits: dict[str, list[SegSample]] = {}
    for split in ("train", "val"):
        split_file = sets / f"{split}.txt"
        samples = []
        for image_id in _read_ids(split_file):
            for folder, files, name in ((images, image_files, "image"), (masks, mask_files, "mask")):
                filename = f"{image_id}.{'jpg' if name == 'image' else 'png'}"
                if filename not in files:
                    raise EvaluationDataNotFoundError(
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
                raise EvaluationDataNotFoundError(f"'{folder}' is missing; {_ADE_LAYOUT}")
        images, masks = _stems(image_dir, _IMAGE_EXTENSIONS), _stems(mask_dir, (".png",))
        if not images:
            raise EvaluationDataError(f"'{image_dir}' holds no images (.jpg); {_ADE_LAYOUT}")
        for stem in sorted(images):
            if stem not in masks:
                raise EvaluationDataNotFoundError(
                    f"image '{image_dir / images[stem]}' has no annotation '{mask_dir / (stem + '.png')}'; "
                    "every image needs a mask of the same name"
                )
        for stem in sorted(masks):
            if stem not in images:
                raise EvaluationDataNotFoundError(
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
def check_pair(
    sample: SegSample, image_size: tuple[int, int], mask_mode: str, mask_size: tuple[int, int]
) -> None:
    """Refuse a mask that is not a palette (``P``) or 8-bit grayscale (``L``) image, or whose size (PIL
    (width, height)) differs from its image's."""
    if mask_mode not in ("P", "L"):
        raise EvaluationDataError(
            f"mask '{sample.mask}' has PIL mode {mask_mode!r}; expected a palette (P) or 8-bit grayscale (L) PNG "
            "whose pixel values are class indices (convert colour masks to class indices first)"
        )
    if image_size != mask_size:
        raise EvaluationDataError(
            f"image '{sample.image}' is {image_size[0]}x{image_size[1]} but its mask '{sample.mask}' is "
            f"{mask_size[0]}x{mask_size[1]}; an image and its mask must have the same size"
        )


def check_headers(samples: Sequence[SegSample], limit: int = HEADER_CHECK_LIMIT) -> None:
    """Open the headers of ``limit`` evenly spaced pairs (all when fewer): mask mode and image/mask sizes."""
    count = len(samples)
    picks = range(count) if count <= limit else np.linspace(0, count - 1, limit).round().astype(int)
    for index in sorted(set(int(i) for i in picks)):
        sample = samples[index]
        check_pair(sample, image_header(sample.image)[1], *image_header(sample.mask))


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
        raise EvaluationDataError(
            f"mask '{path}' holds label values {shown} outside {low}..{top} (255 = ignored{meaning}) for "
            f"num_classes={num_classes}; set num_classes to the data set's class count or fix the mask"
        )
    if not reduce_zero_label:
        return raw.copy()
    labels = raw - 1  # uint8: 0 wraps to 255 (ignored)
    labels[raw == IGNORE_INDEX] = IGNORE_INDEX
    return labels
