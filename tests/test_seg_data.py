"""evaluators.segmentation.data: VOC 2012 / ADE20K layouts, label encoding, joint augmentation, sharding and bad input."""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import evaluators.segmentation.data as seg_data
from dora_lightning.evaluation.synthetic import make_ade20k_fixture
from dora_lightning.imagenet import IMAGENET_MEAN, IMAGENET_STD
from evaluators.segmentation.data import (
    IGNORE_INDEX,
    SegmentationDataModule,
    SegmentationDataset,
    SegSample,
    encode_labels,
    eval_size,
    resolve_layout,
)

SIZE = (24, 32)  # (H, W) of the hand-written layouts
PALETTE = [0, 0, 0, 128, 0, 0, 0, 128, 0, 128, 128, 0] + [7] * (3 * 252)


def label_map(index: int, size: tuple[int, int] = SIZE) -> np.ndarray:
    """Background 0, a rectangle of class 1 + index % 3, a void (255) top row."""
    labels = np.zeros(size, dtype=np.uint8)
    labels[4:16, 6:22] = 1 + index % 3
    labels[0, :] = IGNORE_INDEX
    return labels


def save_palette(labels: np.ndarray, path: Path) -> None:
    mask = Image.fromarray(labels)
    mask.putpalette(PALETTE[:768])  # an L image with a palette becomes a P image, data unchanged
    mask.save(path)


def save_image(path: Path, size: tuple[int, int] = SIZE, seed: int = 0) -> None:
    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def write_voc(root: Path, train: int = 3, val: int = 2) -> Path:
    """A tiny VOC 2012 folder: ids t0.. (train) and v0.. (val), palette masks from :func:`label_map`."""
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for split, count in (("train", train), ("val", val)):
        ids = [f"{split[0]}{i}" for i in range(count)]
        for i, image_id in enumerate(ids):
            save_image(root / "JPEGImages" / f"{image_id}.jpg", seed=i)
            save_palette(label_map(i), root / "SegmentationClass" / f"{image_id}.png")
        (root / "ImageSets/Segmentation" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    return root


def write_ade(root: Path, train: int = 3, val: int = 2, values: tuple[int, ...] = (0, 1, 2, 150)) -> Path:
    """A tiny ADEChallengeData2016 folder: L masks holding the stripes ``values`` (raw ADE labels)."""
    for split, folder, count in (("train", "training", train), ("val", "validation", val)):
        (root / "images" / folder).mkdir(parents=True, exist_ok=True)
        (root / "annotations" / folder).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            stem = f"ADE_{split}_{i:08d}"
            raw = np.zeros(SIZE, dtype=np.uint8)
            for k, value in enumerate(values):
                raw[:, k * 4 : (k + 1) * 4] = value
            save_image(root / "images" / folder / f"{stem}.jpg", seed=i)
            Image.fromarray(raw).save(root / "annotations" / folder / f"{stem}.png")
    return root


def module(root: Path, **kwargs) -> SegmentationDataModule:
    args = {"image_size": 16, "patch_size": 8, "batch_size": 2, "num_workers": 0}
    return SegmentationDataModule(str(root), **{**args, **kwargs})


# ------------------------------------------------------------------------------------------------ layouts
def test_voc_layout_is_read(tmp_path: Path) -> None:
    data = module(write_voc(tmp_path / "voc"))
    data.setup()
    assert data.layout == "voc" and data.num_classes == 21
    assert data.class_names[0] == "background" and data.class_names[15] == "person"
    assert [Path(s.image).name for s in data.train_dataset.samples] == ["t0.jpg", "t1.jpg", "t2.jpg"]
    images, masks = next(iter(data.train_dataloader()))
    assert images.shape == (2, 3, 16, 16) and images.dtype == torch.float32
    assert masks.shape == (2, 16, 16) and masks.dtype == torch.uint8
    assert set(masks.unique().tolist()) <= {0, 1, 2, 3, IGNORE_INDEX}
    images, masks = next(iter(data.val_dataloader()))
    assert isinstance(images, list) and len(images) == 2
    assert images[0].shape == (3, 16, 24)  # short side 16, long side 32 * 16/24 = 21.3 -> 24 (patch 8)
    for i, mask in enumerate(masks):  # labels stay at the original size, unchanged
        assert torch.equal(mask, torch.from_numpy(label_map(i)))


def test_layout_found_in_known_subfolders(tmp_path: Path) -> None:
    voc = write_voc(tmp_path / "a" / "VOCdevkit" / "VOC2012")
    ade = write_ade(tmp_path / "b" / "ADEChallengeData2016")
    assert resolve_layout(tmp_path / "a") == ("voc", voc)
    assert resolve_layout(tmp_path / "b") == ("ade20k", ade)
    assert resolve_layout(ade, "ade20k") == ("ade20k", ade)


def test_ade20k_reduce_zero_label(tmp_path: Path) -> None:
    data = module(write_ade(tmp_path / "ade", values=(0, 1, 2, 150, 255)))
    data.setup()
    assert data.layout == "ade20k" and data.num_classes == 150
    assert data.class_names[:2] == ["0", "1"]  # no objectInfo150.txt: indices
    _, labels = data.val_dataset[0]
    assert labels[0, :20:4].tolist() == [255, 0, 1, 149, 255]  # 0 ("other") ignored, 1..150 -> 0..149


def test_generated_ade20k_fixture_is_read_with_reduced_labels(tmp_path: Path) -> None:
    root = make_ade20k_fixture(tmp_path / "ade", images=8, size=(48, 64), classes=3)
    (root / "objectInfo150.txt").write_text(
        "Idx\tRatio\tTrain\tVal\tName\n" + "".join(f"{i + 1}\t0.1\t1\t1\tname{i}\n" for i in range(150))
    )
    data = module(root)
    data.setup()
    assert (len(data.train_dataset), len(data.val_dataset)) == (6, 2)
    assert data.class_names[:2] == ["name0", "name1"]
    for sample, (_, labels) in zip(data.val_dataset.samples, data.val_dataset, strict=True):
        raw = torch.from_numpy(np.array(Image.open(sample.mask)))
        expected = torch.where(raw == 0, torch.tensor(255, dtype=torch.uint8), raw - 1)
        assert torch.equal(labels, expected) and bool((labels < 3).any())  # shapes: classes 0..2


def test_encode_labels() -> None:
    raw = np.array([[0, 1, 20, 255]], dtype=np.uint8)
    assert encode_labels(raw, 21, False, "m.png").tolist() == [[0, 1, 20, 255]]
    assert encode_labels(raw, 21, True, "m.png").tolist() == [[255, 0, 19, 255]]
    with pytest.raises(
        ValueError, match=r"mask 'm.png' holds label values 20 outside 0..19 .* num_classes=20"
    ):
        encode_labels(raw, 20, False, "m.png")
    with pytest.raises(ValueError, match=r"holds label values 20 outside 1..19 \(255 = ignored; 0 = other"):
        encode_labels(raw, 19, True, "m.png")


@pytest.mark.parametrize(
    ("height", "width", "image_size", "patch", "expected"),
    [
        (375, 500, 512, 16, (512, 688)),  # 500 * 512/375 = 682.7 -> 688
        (500, 375, 512, 16, (688, 512)),
        (100, 100, 32, 8, (32, 32)),
        (10, 1000, 32, 8, (32, 3200)),
        (64, 66, 32, 8, (32, 32)),  # 33 rounds to 32
    ],
)
def test_eval_size(height: int, width: int, image_size: int, patch: int, expected: tuple[int, int]) -> None:
    assert eval_size(height, width, image_size, patch) == expected


def test_training_crops_move_image_and_mask_together(tmp_path: Path) -> None:
    """Each class has its own colour; after crop + flip the mask must still match the image's colours."""
    colours = np.array([[200, 30, 30], [30, 200, 30], [30, 30, 200]], dtype=np.uint8)
    labels = np.zeros((48, 64), dtype=np.uint8)
    labels[:, :20] = 1  # left-right asymmetric, so a flip of only one of them would show
    labels[30:, 40:] = 2
    Image.fromarray(colours[labels]).save(tmp_path / "img.png")
    save_palette(labels, tmp_path / "mask.png")
    sample = SegSample(str(tmp_path / "img.png"), str(tmp_path / "mask.png"))
    dataset = SegmentationDataset([sample], 21, False, image_size=32, patch_size=8, train=True)
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    palette = torch.tensor(colours.T, dtype=torch.float32)[:, :, None, None]
    flipped = 0
    torch.manual_seed(0)
    for _ in range(20):
        image, mask = dataset[0]
        assert image.shape == (3, 32, 32) and mask.shape == (32, 32)
        rgb = (image * std + mean) * 255
        nearest = (rgb[None] - palette).square().sum(1).argmin(0)
        # pixels whose 3x3 neighbourhood holds one class (boundaries blur under bilinear resizing)
        padded = mask.float()[None, None]
        interior = (F.max_pool2d(padded, 3, 1, 1) == -F.max_pool2d(-padded, 3, 1, 1))[0, 0]
        assert interior.float().mean() > 0.7
        assert torch.equal(nearest[interior], mask.long()[interior])
        flipped += int(mask[:, 0].eq(2).any() or mask[:, -1].eq(1).all())
    assert flipped > 0  # some crops were flipped


def test_validation_shards_hold_every_image_once(tmp_path: Path) -> None:
    data = module(write_voc(tmp_path / "voc", val=5))
    shards = [list(data.val_dataloader(rank, 2).sampler) for rank in (0, 1)]
    assert shards == [[0, 2, 4], [1, 3]]
    assert sum(len(images) for images, _ in data.val_dataloader(1, 2)) == 2


def test_num_classes_override(tmp_path: Path) -> None:
    root = write_voc(tmp_path / "voc")
    data = module(root, num_classes=4)
    assert data.num_classes == 4 and data.class_names == ["0", "1", "2", "3"]
    data.val_dataset[1]  # values 0..3 and 255 fit
    small = module(root, num_classes=2)
    small.setup()
    small.val_dataset[0]  # v0 holds class 1
    mask = root / "SegmentationClass" / "v1.png"
    with pytest.raises(ValueError, match=re.escape(f"mask '{mask}' holds label values 2 outside 0..1")):
        small.val_dataset[1]


def test_constructor_refuses_bad_arguments(tmp_path: Path) -> None:
    for kwargs, message in (
        ({"image_size": 20}, "image_size 20 must be a positive multiple of the patch size 8"),
        ({"num_classes": 1}, "num_classes must be in 2..255"),
        ({"num_classes": 256}, "num_classes must be in 2..255"),
        ({"crop_scale": (0.5, 0.2)}, "crop_scale must be"),
    ):
        with pytest.raises(ValueError, match=re.escape(message)):
            module(tmp_path, **kwargs)


# ------------------------------------------------------------------------------------------------ bad input
def _corrupt(path: Path) -> None:
    path.write_bytes(b"not an image")


def _resize_mask(path: Path) -> None:
    save_palette(label_map(0, (24, 30)), path)


def _rgb_mask(path: Path) -> None:
    Image.fromarray(np.zeros((*SIZE, 3), dtype=np.uint8)).save(path)


def _large_label(path: Path) -> None:
    labels = label_map(0)
    labels[5, 5] = 30
    save_palette(labels, path)


VOC_MASK = "SegmentationClass/v0.png"
# case: (what to break, file whose name the message carries (relative to the root or None), message, when)
CASES: dict[str, tuple[Callable[[Path], object], str | None, str, str]] = {
    "missing_dir": (lambda r: None, None, "does not exist or is not a folder", "setup"),
    "no_layout": (lambda r: (r / "other").mkdir(), None, "is neither a VOC nor an ADE20K folder", "setup"),
    "no_masks": (
        lambda r: shutil.rmtree(r / "SegmentationClass"),
        "SegmentationClass",
        "' is missing; a Pascal VOC 2012 folder holds",
        "setup",
    ),
    "no_split_file": (
        lambda r: (r / "ImageSets/Segmentation/val.txt").unlink(),
        "ImageSets/Segmentation/val.txt",
        "' is missing",
        "setup",
    ),
    "empty_split": (
        lambda r: (r / "ImageSets/Segmentation/val.txt").write_text("\n"),
        "ImageSets/Segmentation/val.txt",
        "' lists no image ids",
        "setup",
    ),
    "image_missing": (
        lambda r: (r / "JPEGImages/v0.jpg").unlink(),
        "JPEGImages/v0.jpg",
        "' does not exist; restore the file",
        "setup",
    ),
    "mask_missing": (lambda r: (r / VOC_MASK).unlink(), VOC_MASK, "' does not exist", "setup"),
    "corrupt_image": (lambda r: _corrupt(r / "JPEGImages/v0.jpg"), "JPEGImages/v0.jpg", "': ", "setup"),
    "size_mismatch": (
        lambda r: _resize_mask(r / VOC_MASK),
        VOC_MASK,
        "' is 30x24; an image and its mask",
        "setup",
    ),
    "rgb_mask": (
        lambda r: _rgb_mask(r / VOC_MASK),
        VOC_MASK,
        "' has PIL mode 'RGB'; expected a palette",
        "setup",
    ),
    "label_range": (
        lambda r: _large_label(r / VOC_MASK),
        VOC_MASK,
        "' holds label values 30 outside 0..20",
        "load",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_malformed_voc_folders_give_clear_errors(case: str, tmp_path: Path) -> None:
    breaker, culprit, message, when = CASES[case]
    root = tmp_path / "voc"
    if case != "missing_dir":
        write_voc(root) if case != "no_layout" else root.mkdir()
        breaker(root)
    data = module(root)
    expected = re.escape(str(root / culprit) if culprit else str(root)) + ".*" + re.escape(message)
    if when == "setup":
        with pytest.raises(ValueError, match=expected):
            data.setup()
    else:
        data.setup()  # header checks pass; the label range is checked when the mask is decoded
        with pytest.raises(ValueError, match=expected):
            next(iter(data.val_dataloader()))


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("no_annotation", "images/training/ADE_train_00000001.jpg' has no annotation"),
        ("stray_annotation", "annotations/validation/extra.png' has no image"),
        ("missing_split", "annotations/validation' is missing; an ADE20K folder holds"),
        ("label_range", "annotations/validation/ADE_val_00000000.png' holds label values 151 outside 1..150"),
        ("both_layouts", "holds both VOC (JPEGImages/...) and ADE20K"),
        ("ade_asked_on_voc", "images/training' is missing; an ADE20K folder holds"),
    ],
)
def test_malformed_ade20k_folders_give_clear_errors(case: str, message: str, tmp_path: Path) -> None:
    root = write_ade(tmp_path / "ade")
    dataset = "auto"
    if case == "no_annotation":
        (root / "annotations/training/ADE_train_00000001.png").unlink()
    elif case == "stray_annotation":
        Image.fromarray(np.zeros(SIZE, dtype=np.uint8)).save(root / "annotations/validation/extra.png")
    elif case == "missing_split":
        (root / "annotations/validation").rename(root / "annotations/val")
    elif case == "label_range":
        Image.fromarray(np.full(SIZE, 151, dtype=np.uint8)).save(
            root / "annotations/validation/ADE_val_00000000.png"
        )
    elif case == "both_layouts":
        (root / "JPEGImages").mkdir()
    else:
        root, dataset = write_voc(tmp_path / "voc"), "ade20k"
    data = module(root, dataset=dataset)
    with pytest.raises(ValueError, match=re.escape(message)):
        data.setup()
        next(iter(data.val_dataloader()))


def test_large_sets_are_checked_per_sample_when_loaded(tmp_path: Path, monkeypatch) -> None:
    """Headers of only HEADER_CHECK_LIMIT pairs are opened in setup; the others are checked when loaded."""
    root = write_voc(tmp_path / "voc", val=4)
    _resize_mask(root / "SegmentationClass/v1.png")
    monkeypatch.setattr(seg_data, "HEADER_CHECK_LIMIT", 2)  # checks v0 and v3 only
    data = module(root)
    data.setup()
    data.val_dataset[0]
    with pytest.raises(
        ValueError, match=re.escape(f"its mask '{root / 'SegmentationClass/v1.png'}' is 30x24")
    ):
        data.val_dataset[1]
