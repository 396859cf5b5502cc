"""Labelled images in the ImageFolder layout for the evaluators (k-NN, linear probe); see docs/evaluation.md.

Layout (any data set; ImageNet's train/val folders already have it)::

    ROOT/train/<class_name>/<image files, possibly in sub-folders>
    ROOT/val/<class_name>/<image files, possibly in sub-folders>

Both splits must hold the same class folders; labels are the class folders' indices in sorted (alphabetical) order,
as in torchvision's ImageFolder. Hidden entries (names starting with ``.``, e.g. ``.DS_Store``,
``.ipynb_checkpoints``) are ignored; every other file must be an image with one of torchvision's extensions
(``IMG_EXTENSIONS``), and every class folder must hold at least one. The layout is checked once, in
:meth:`ImageFolderDataModule.setup`, before any image is decoded; an image that cannot be decoded is reported, by
path, when it is loaded. Both raise :class:`~dora_lightning.evaluation.contract.EvaluationDataError` (a ``ValueError``; missing folders
raise its ``FileNotFoundError`` subclass :class:`~dora_lightning.evaluation.contract.EvaluationDataNotFoundError`).

Also shared by the other evaluators: :func:`rgb_image` (any image as 8-bit RGB, 16-bit grayscale scaled, not
clipped).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Sampler
from torchvision import transforms as T
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from dora_lightning.evaluation.contract import EvaluationDataError, EvaluationDataNotFoundError
from dora_lightning.evaluation.samplers import unrepeated_sampler
from dora_lightning.imagenet import IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImageFolderDataModule",
    "eval_transform",
    "load_rgb",
    "rgb_image",
    "scan_split",
    "train_transform",
]

SPLITS = ("train", "val")
_LAYOUT = (
    "expected ROOT/train/<class_name>/<images> and ROOT/val/<class_name>/<images> (see docs/evaluation.md)"
)


# PIL modes of 16-bit single-channel images ("I": 32-bit integers, which is how PIL gives some 16-bit files); PIL's
# convert("RGB") clips them at 255 (almost all white), so they are scaled to 8 bits first. 16-bit RGB(A) files already
# open as 8-bit "RGB"/"RGBA" (PIL keeps the high byte).
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I"})


def rgb_image(image: Image.Image) -> Image.Image:
    """``image`` as 8-bit RGB: grayscale and palette images are converted; 16-bit grayscale (and mode ``I``, clipped
    to 0..65535) is scaled from 0..65535 to 0..255 (rounded) instead of being clipped. 8-bit images are converted
    exactly as ``image.convert("RGB")``."""
    if image.mode not in _SIXTEEN_BIT_MODES:
        return image.convert("RGB")
    wide = np.clip(np.asarray(image).astype(np.int64), 0, 65535)
    eight = ((wide * 255 + 32767) // 65535).astype(np.uint8)  # round(v * 255 / 65535)
    return Image.fromarray(eight).convert("RGB")


def load_rgb(path: str) -> Image.Image:
    """Open an image file as 8-bit RGB (:func:`rgb_image`); errors
    (:class:`~dora_lightning.evaluation.contract.EvaluationDataError`) name the file."""
    try:
        with open(path, "rb") as fh:
            return rgb_image(Image.open(fh))
    except Exception as err:  # PIL raises several kinds (UnidentifiedImageError, OSError, SyntaxError, ...)
        raise EvaluationDataError(f"cannot read image '{path}': {type(err).__name__}: {err}") from err


def _visible(name: str) -> bool:
    return not name.startswith(".")


def _brief(names: list[str], limit: int = 10) -> str:
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _class_folders(split_dir: Path) -> list[str]:
    """Sorted visible class folder names of a split; refuses loose files and a split without class folders."""
    classes, loose = [], []
    with os.scandir(split_dir) as entries:
        for entry in entries:
            if not _visible(entry.name):
                continue
            (classes if entry.is_dir() else loose).append(entry.name)
    if loose:
        first = split_dir / sorted(loose)[0]
        raise EvaluationDataError(
            f"'{first}' is a file directly in the split folder '{split_dir}' ({len(loose)} such file(s)); "
            f"every image must be inside its class folder: {split_dir}/<class_name>/<image>"
        )
    if not classes:
        raise EvaluationDataError(f"'{split_dir}' holds no class folders; {_LAYOUT}")
    return sorted(classes)


def scan_split(split_dir: str | Path, classes: list[str]) -> list[tuple[str, int]]:
    """Every image of ``split_dir/<class>/**`` as (path, class index), in sorted order, checking each file.

    Raises:
        EvaluationDataError: a class folder holds no image, or a visible file is not an image (by extension).
    """
    split_dir = Path(split_dir)
    samples: list[tuple[str, int]] = []
    for index, name in enumerate(classes):
        class_dir = split_dir / name
        found: list[tuple[str, str]] = []
        for folder, dirs, files in os.walk(class_dir, followlinks=True):
            dirs[:] = [d for d in dirs if _visible(d)]  # prune hidden folders while walking
            found.extend((folder, fname) for fname in files if _visible(fname))
        found.sort()  # torchvision's order: by folder, then file name
        others = [os.path.join(*f) for f in found if not f[1].lower().endswith(IMG_EXTENSIONS)]
        if others:
            more = f" (and {len(others) - 1} more in this class folder)" if len(others) > 1 else ""
            raise EvaluationDataError(
                f"'{others[0]}' is not an image file{more}; supported extensions: {', '.join(IMG_EXTENSIONS)}; "
                f"remove it or move it out of '{split_dir.parent}'"
            )
        samples.extend((os.path.join(folder, fname), index) for folder, fname in found)
        if not found:
            raise EvaluationDataError(
                f"class folder '{class_dir}' holds no images; every class needs at least one image in each split "
                f"(supported extensions: {', '.join(IMG_EXTENSIONS)})"
            )
    return samples


class _CheckedImageFolder(ImageFolder):
    """torchvision's ImageFolder over classes and samples already found (and checked) by :func:`scan_split`."""

    def __init__(
        self, root: Path, classes: list[str], samples: list[tuple[str, int]], transform: Any
    ) -> None:
        self._checked_classes, self._checked_samples = list(classes), list(samples)
        super().__init__(str(root), transform=transform, loader=load_rgb)

    def find_classes(self, directory: str | Path) -> tuple[list[str], dict[str, int]]:
        return list(self._checked_classes), {name: i for i, name in enumerate(self._checked_classes)}

    def make_dataset(  # type: ignore[override]
        self, directory: str | Path, class_to_idx: dict[str, int], *args: Any, **kwargs: Any
    ) -> list[tuple[str, int]]:
        return list(self._checked_samples)


def eval_transform(image_size: int, resize_ratio: float = 256 / 224) -> T.Compose:
    """Resize(int(image_size * resize_ratio), bicubic) + CenterCrop(image_size) + ImageNet normalisation (spec D)."""
    return T.Compose(
        [
            T.Resize(int(image_size * resize_ratio), interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(image_size),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def train_transform(image_size: int) -> T.Compose:
    """DINO eval_linear's training augmentation: RandomResizedCrop(image_size) + horizontal flip + normalisation."""
    return T.Compose(
        [
            T.RandomResizedCrop(image_size),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


class ImageFolderDataModule(pl.LightningDataModule):
    """Train/val images from ``root/train`` and ``root/val`` (one folder per class) for the evaluators.

    Images are read as 8-bit RGB (:func:`load_rgb`). The eval transform is Resize(int(image_size * resize_ratio),
    bicubic) + CenterCrop(image_size) + ImageNet normalisation (Resize 256 / CenterCrop 224 at the defaults, spec D); with
    ``train_augment`` the training loader uses RandomResizedCrop(image_size) + horizontal flip instead (DINO's linear
    probe), otherwise the eval transform.

    Args:
        root: the folder holding ``train/`` and ``val/``.
        image_size: side of the square images the loaders yield.
        batch_size: images per batch per process.
        num_workers: dataloader worker processes (0 loads in the main process).
        train_augment: augment the training images (``train_dataloader`` only).
        resize_ratio: resize side / crop side of the eval transform (>= 1).

    Loaders: ``train_dataloader()`` (shuffled), ``val_dataloader()`` and ``train_eval_dataloader()`` (the training
    images, unshuffled, with the eval transform: the memory bank of k-NN). Each batch is (images (B, 3, S, S) float,
    labels (B,) int64). All three and the properties ``num_classes``, ``class_names`` run :meth:`setup` first if
    it has not run.
    """

    def __init__(
        self,
        root: str,
        image_size: int = 224,
        batch_size: int = 256,
        num_workers: int = 2,
        train_augment: bool = False,
        resize_ratio: float = 256 / 224,
    ) -> None:
        super().__init__()
        if image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {image_size}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if int(image_size * resize_ratio) < image_size:
            raise ValueError(
                f"resize_ratio must be >= 1 (the resize side int(image_size * resize_ratio) = "
                f"{int(image_size * resize_ratio)} is smaller than the crop {image_size}), got {resize_ratio}"
            )
        self.root = Path(root)
        self.image_size = int(image_size)
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.train_augment = bool(train_augment)
        self.resize_ratio = float(resize_ratio)
        self.eval_transform = eval_transform(self.image_size, self.resize_ratio)
        self.train_transform = train_transform(self.image_size) if self.train_augment else self.eval_transform
        self._classes: list[str] | None = None
        self.train_dataset: ImageFolder | None = None
        self.train_eval_dataset: ImageFolder | None = None
        self.val_dataset: ImageFolder | None = None

    # ------------------------------------------------------------------------------------------------ layout
    def _check_layout(self) -> list[str]:
        if not self.root.is_dir():
            raise EvaluationDataNotFoundError(
                f"data folder '{self.root}' does not exist or is not a folder; {_LAYOUT}"
            )
        for split in SPLITS:
            if not (self.root / split).is_dir():
                raise EvaluationDataNotFoundError(
                    f"'{self.root / split}' does not exist or is not a folder; {_LAYOUT}"
                )
        train, val = (_class_folders(self.root / split) for split in SPLITS)
        if train != val:
            only_train = sorted(set(train) - set(val))
            only_val = sorted(set(val) - set(train))
            parts = [
                f"only in {where}: {_brief(names)}"
                for where, names in ((self.root / "train", only_train), (self.root / "val", only_val))
                if names
            ]
            raise EvaluationDataError(
                f"'{self.root / 'train'}' and '{self.root / 'val'}' must hold the same class folders; "
                + "; ".join(parts)
            )
        return train

    def setup(self, stage: str | None = None) -> None:
        """Check the layout (once) and build the datasets; raises :class:`~dora_lightning.evaluation.contract.EvaluationDataError`
        (a ``ValueError``) naming what is wrong."""
        if self._classes is not None:
            return
        classes = self._check_layout()
        train_samples = scan_split(self.root / "train", classes)
        val_samples = scan_split(self.root / "val", classes)
        self.train_dataset = _CheckedImageFolder(
            self.root / "train", classes, train_samples, self.train_transform
        )
        self.train_eval_dataset = _CheckedImageFolder(
            self.root / "train", classes, train_samples, self.eval_transform
        )
        self.val_dataset = _CheckedImageFolder(self.root / "val", classes, val_samples, self.eval_transform)
        self._classes = classes

    # ------------------------------------------------------------------------------------------------ info
    @property
    def class_names(self) -> list[str]:
        """Class folder names; label ``i`` is ``class_names[i]`` (sorted order)."""
        self.setup()
        assert self._classes is not None
        return list(self._classes)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    # ------------------------------------------------------------------------------------------------ loaders
    def _loader(
        self, dataset: ImageFolder | None, shuffle: bool, sampler: Sampler | None = None
    ) -> DataLoader:
        assert dataset is not None
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            sampler=sampler,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
            drop_last=False,
        )

    def train_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.train_dataset, shuffle=True)

    def val_dataloader(self, rank: int = 0, world_size: int = 1) -> DataLoader:
        """The validation images in file order; with ``world_size`` > 1, process ``rank``'s share of them, each image
        in exactly one share (:func:`dora_lightning.evaluation.samplers.unrepeated_sampler`: no padding repeats, so metrics summed
        over processes count every image once). Without arguments (as Lightning calls a data module's loaders) it
        holds every image, and Lightning shards it under DDP with its padding ``DistributedSampler``."""
        self.setup()
        assert self.val_dataset is not None
        return self._loader(
            self.val_dataset, shuffle=False, sampler=unrepeated_sampler(self.val_dataset, rank, world_size)
        )

    def train_eval_dataloader(self) -> DataLoader:
        """The training images in file order with the eval transform (k-NN memory bank)."""
        self.setup()
        return self._loader(self.train_eval_dataset, shuffle=False)
