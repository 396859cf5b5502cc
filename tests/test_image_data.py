"""ImageFolderDataModule: layouts, transforms, loaders, every error; the bundled Fashion-MNIST subset and its script."""

from __future__ import annotations

import gzip
import importlib.util
import re
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import RandomSampler, SequentialSampler
from torchvision import transforms as T

from dora_lightning.evaluation.contract import EvaluatorSettingError
from dora_lightning.evaluation.image_data import ImageFolderDataModule, load_rgb
from dora_lightning.evaluation.loader_limits import batches_per_process, refuse_cut_images, refuse_cut_loader
from dora_lightning.imagenet import IMAGENET_MEAN, IMAGENET_STD

REPO = Path(__file__).resolve().parents[1]
BUNDLED = REPO / "assets" / "fashion_mnist"
FASHION_CLASSES = [
    "t_shirt_top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle_boot",
]


def write_image(
    path: Path, value: int | tuple[int, int, int] = 128, size: int = 20, mode: str = "RGB"
) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (size, size), value).save(path)
    return path


def make_tree(root: Path, layout: dict[str, dict[str, int]]) -> Path:
    """``layout[split][class] = number of PNGs`` (0 makes an empty class folder)."""
    for split, classes in layout.items():
        for name, count in classes.items():
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                write_image(root / split / name / f"{i}.png", value=(10 * i, 0, 0))
    return root


GOOD = {"train": {"cat": 3, "dog": 2, "ant": 1}, "val": {"cat": 1, "dog": 1, "ant": 2}}


def setup_error(root: Path, **kwargs: object) -> str:
    data = ImageFolderDataModule(str(root), image_size=16, batch_size=4, num_workers=0, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError) as info:
        data.setup()
    return str(info.value)


# ----------------------------------------------------------------------------------------------------- good layouts
def test_good_layout_classes_samples_and_batches(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "d", GOOD)
    data = ImageFolderDataModule(str(root), image_size=16, batch_size=4, num_workers=0)
    assert data.class_names == ["ant", "cat", "dog"]  # sorted, like torchvision's ImageFolder
    assert data.num_classes == 3
    assert len(data.train_dataset) == 6 and len(data.val_dataset) == 4
    for path, label in data.train_dataset.samples:
        assert Path(path).parent.name == data.class_names[label]
    images, labels = next(iter(data.val_dataloader()))
    assert images.shape == (4, 3, 16, 16) and images.dtype == torch.float32
    assert labels.tolist() == [0, 0, 1, 2]  # val: ant x2, cat, dog in order


def test_nested_hidden_uppercase_and_grayscale(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "d", {"train": {"a": 1, "b": 1}, "val": {"a": 1, "b": 1}})
    write_image(root / "train" / "a" / "sub" / "deeper" / "x.png")  # nested folders count, as in ImageFolder
    write_image(root / "train" / "b" / "y.JPEG")  # ImageNet's val files have upper-case extensions
    write_image(root / "train" / "b" / "g.png", value=255, mode="L")  # grayscale -> RGB
    (root / "train" / "a" / ".DS_Store").write_bytes(b"junk")  # hidden files are ignored
    (root / "train" / ".ipynb_checkpoints").mkdir()  # hidden folders are not classes
    (root / "val" / "b" / ".hidden").mkdir()
    (root / "val" / "b" / ".hidden" / "notes.txt").write_text("ignored")
    data = ImageFolderDataModule(str(root), image_size=8, batch_size=8, num_workers=0)
    assert data.class_names == ["a", "b"]
    names = sorted(Path(p).name for p, _ in data.train_dataset.samples)
    assert names == ["0.png", "0.png", "g.png", "x.png", "y.JPEG"]
    images, _ = next(iter(data.train_eval_dataloader()))
    assert images.shape == (5, 3, 8, 8)
    white = [i for i, (p, _) in enumerate(data.train_eval_dataset.samples) if p.endswith("g.png")][0]
    expected = torch.tensor([(1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True)])
    assert torch.allclose(images[white].mean(dim=(1, 2)), expected, atol=1e-5)  # RGB + ImageNet normalisation


RAMP16 = np.linspace(0, 65535, 32 * 32).astype(np.uint16).reshape(32, 32)  # every 16th of the 65536 levels


def save_16_bit(path: Path, mode: str) -> Path:
    """RAMP16 as a 16-bit grayscale file of PIL ``mode`` (I;16 PNG, big-endian I;16B TIFF, 32-bit I TIFF)."""
    if mode == "I;16":
        image = Image.fromarray(RAMP16)
    elif mode == "I;16B":
        image = Image.frombytes("I;16B", (32, 32), RAMP16.astype(">u2").tobytes())
    else:
        image = Image.fromarray(RAMP16.astype(np.int32))
    image.save(path)
    with Image.open(path) as reread:
        assert reread.mode == mode
    return path


@pytest.mark.parametrize(("mode", "name"), [("I;16", "a.png"), ("I;16B", "b.tif"), ("I", "c.tif")])
def test_16_bit_grayscale_is_scaled_not_clipped(tmp_path: Path, mode: str, name: str) -> None:
    """PIL's convert("RGB") clips 16-bit values at 255: a full-range ramp came out 99.6 % white. Now 0..65535 maps
    to 0..255 (rounded), so the ramp stays a ramp, in all three channels."""
    rgb = np.asarray(load_rgb(str(save_16_bit(tmp_path / name, mode))))
    assert rgb.shape == (32, 32, 3) and rgb.dtype == np.uint8
    expected = np.round(RAMP16.astype(np.float64) * 255 / 65535).astype(np.uint8)
    for channel in range(3):
        np.testing.assert_array_equal(rgb[..., channel], expected)
    assert rgb.min() == 0 and rgb.max() == 255 and len(np.unique(rgb)) == 256


@pytest.mark.parametrize("mode", ["L", "P", "RGB", "RGBA", "LA", "CMYK", "1"])
def test_8_bit_images_load_as_before(tmp_path: Path, mode: str) -> None:
    """Only 16-bit images take the scaling path: every other mode is PIL's convert("RGB"), byte for byte."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(12, 12, 4), dtype=np.uint8)
    source = Image.fromarray(pixels, "RGBA")
    image = source.convert(mode) if mode != "P" else source.convert("RGB").quantize(17)
    path = tmp_path / ("x.tif" if mode == "CMYK" else "x.png")
    image.save(path)
    with Image.open(path) as reread:
        assert load_rgb(str(path)).tobytes() == reread.convert("RGB").tobytes()


def test_eval_transform_resize_crop(tmp_path: Path) -> None:
    data = ImageFolderDataModule(str(tmp_path), image_size=224)
    resize, crop = data.eval_transform.transforms[:2]
    assert isinstance(resize, T.Resize) and resize.size == 256
    assert resize.interpolation == T.InterpolationMode.BICUBIC
    assert isinstance(crop, T.CenterCrop) and crop.size == (224, 224)
    small = ImageFolderDataModule(str(tmp_path), image_size=32, resize_ratio=1.5)
    assert small.eval_transform.transforms[0].size == 48
    # the crop is taken from the centre: a 48x48 image with a 8-px black frame around white, resized to 36 (ratio
    # 256/224 at 32) and centre-cropped to 32, keeps 2.5 px of frame on each side and white in the middle
    frame = np.zeros((48, 48, 3), np.uint8)
    frame[8:40, 8:40] = 255
    out = ImageFolderDataModule(str(tmp_path), image_size=32).eval_transform(Image.fromarray(frame))
    assert out.shape == (3, 32, 32)
    assert out[0, 16, 0] < 0 < out[0, 16, 16]


def test_train_augment_and_shuffling(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "d", GOOD)
    plain = ImageFolderDataModule(str(root), image_size=16, batch_size=2, num_workers=0)
    assert plain.train_transform is plain.eval_transform
    aug = ImageFolderDataModule(str(root), image_size=16, batch_size=2, num_workers=0, train_augment=True)
    kinds = [type(t) for t in aug.train_transform.transforms]
    assert kinds[:2] == [T.RandomResizedCrop, T.RandomHorizontalFlip]
    assert aug.train_transform.transforms[0].size == (16, 16)
    aug.setup()
    assert aug.train_dataset.transform is aug.train_transform
    assert aug.train_eval_dataset.transform is aug.eval_transform  # k-NN bank: never augmented
    assert aug.val_dataset.transform is aug.eval_transform
    assert isinstance(aug.train_dataloader().sampler, RandomSampler)
    for loader in (aug.val_dataloader(), aug.train_eval_dataloader()):
        assert isinstance(loader.sampler, SequentialSampler)
    labels = torch.cat([y for _, y in aug.train_eval_dataloader()]).tolist()
    assert labels == [0, 1, 1, 1, 2, 2]


def test_worker_processes_load(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "d", GOOD)
    data = ImageFolderDataModule(str(root), image_size=8, batch_size=8, num_workers=1)
    images, labels = next(iter(data.val_dataloader()))
    assert images.shape == (4, 3, 8, 8) and labels.tolist() == [0, 0, 1, 2]


def test_setup_runs_once_and_properties_set_up(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "d", GOOD)
    data = ImageFolderDataModule(str(root), image_size=8, num_workers=0)
    assert data.train_dataset is None
    assert data.num_classes == 3 and data.train_dataset is not None
    first = data.train_dataset
    write_image(root / "train" / "cat" / "late.png")  # a second setup() must not rescan
    data.setup("fit")
    assert data.train_dataset is first and len(first) == 6


# ----------------------------------------------------------------------------------------------------- bad layouts
def test_missing_root(tmp_path: Path) -> None:
    msg = setup_error(tmp_path / "nowhere")
    assert f"'{tmp_path / 'nowhere'}' does not exist" in msg and "train/<class_name>" in msg


@pytest.mark.parametrize("missing", ["train", "val"])
def test_missing_split(tmp_path: Path, missing: str) -> None:
    root = make_tree(tmp_path / "d", {k: v for k, v in GOOD.items() if k != missing})
    msg = setup_error(root)
    assert f"'{root / missing}' does not exist or is not a folder" in msg


def test_split_is_a_file(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "d", {"train": GOOD["train"]})
    (root / "val").write_text("not a folder")
    assert f"'{root / 'val'}' does not exist or is not a folder" in setup_error(root)


def test_split_without_class_folders(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "d", {"train": GOOD["train"]})
    (root / "val").mkdir()
    assert f"'{root / 'val'}' holds no class folders" in setup_error(root)


def test_loose_file_in_split(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "d", GOOD)
    write_image(root / "train" / "stray.png")
    msg = setup_error(root)
    assert f"'{root / 'train' / 'stray.png'}' is a file directly in the split folder" in msg
    assert "<class_name>/<image>" in msg


def test_class_folders_differ(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "d", {"train": {"cat": 1, "dog": 1, "eel": 1}, "val": {"cat": 1, "fox": 1}})
    msg = setup_error(root)
    assert f"'{root / 'train'}' and '{root / 'val'}' must hold the same class folders" in msg
    assert f"only in {root / 'train'}: dog, eel" in msg
    assert f"only in {root / 'val'}: fox" in msg


def test_class_missing_from_val_only(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "d", {"train": {"cat": 1, "dog": 1}, "val": {"cat": 1}})
    msg = setup_error(root)
    assert f"only in {root / 'train'}: dog" in msg and "only in " + str(root / "val") not in msg


@pytest.mark.parametrize("split", ["train", "val"])
def test_empty_class_folder(tmp_path: Path, split: str) -> None:
    layout = {"train": {"cat": 1, "dog": 1}, "val": {"cat": 1, "dog": 1}}
    layout[split]["dog"] = 0
    root = make_tree(tmp_path / "d", layout)
    (root / split / "dog" / ".DS_Store").write_bytes(b"")  # hidden files do not count as images
    msg = setup_error(root)
    assert f"class folder '{root / split / 'dog'}' holds no images" in msg


@pytest.mark.parametrize("where", ["val/cat/notes.txt", "train/dog/sub/labels.csv", "train/cat/image"])
def test_non_image_file(tmp_path: Path, where: str) -> None:
    root = make_tree(tmp_path / "d", {"train": {"cat": 1, "dog": 1}, "val": {"cat": 1, "dog": 1}})
    bad = root / where
    bad.parent.mkdir(parents=True, exist_ok=True)
    bad.write_text("not an image")
    msg = setup_error(root)
    assert f"'{bad}' is not an image file" in msg and ".png" in msg


def test_corrupt_image_named_when_loaded(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "d", GOOD)
    bad = root / "val" / "cat" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n but not really")
    data = ImageFolderDataModule(str(root), image_size=8, batch_size=8, num_workers=0)
    with pytest.raises(ValueError, match=re.escape(f"cannot read image '{bad}'")):
        next(iter(data.val_dataloader()))
    with pytest.raises(ValueError, match="cannot read image"):
        load_rgb(str(bad))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"image_size": 0}, "image_size must be >= 1"),
        ({"batch_size": 0}, "batch_size must be >= 1"),
        ({"num_workers": -1}, "num_workers must be >= 0"),
        ({"resize_ratio": 0.9}, "resize_ratio must be >= 1"),
    ],
)
def test_bad_arguments(tmp_path: Path, kwargs: dict[str, float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ImageFolderDataModule(str(tmp_path), **kwargs)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------------- batch limits
def test_batches_per_process() -> None:
    assert batches_per_process(2000, 256, 1) == 8
    assert batches_per_process(2000, 256, 2) == 4  # 1000 images per process
    assert batches_per_process(7, 2, 2) == 2  # the larger share: 4 images
    assert batches_per_process(1, 256, 1) == 1


@pytest.mark.parametrize(
    ("trainer_args", "option", "kept"),
    [
        ({"limit_val_batches": 2}, "--trainer.limit_val_batches 2", 2),
        ({"limit_val_batches": 0.5}, "--trainer.limit_val_batches 0.5", 4),
        ({"limit_val_batches": 0}, "--trainer.limit_val_batches 0", 0),
        ({"fast_dev_run": True}, "--trainer.fast_dev_run True", 1),
        ({"overfit_batches": 3}, "--trainer.overfit_batches 3", 3),
    ],
)
def test_a_limit_that_cuts_a_loader_is_refused(trainer_args: dict, option: str, kept: int) -> None:
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, **trainer_args)
    with pytest.raises(EvaluatorSettingError) as info:
        refuse_cut_loader(trainer, "val", 8, "the 2000 training images")
    message = str(info.value)
    assert message.startswith(
        f"{option} would run {kept} of the 8 batches (per process) of the 2000 training images"
    )
    assert "remove the limit, or evaluate a smaller data set (--evaluator.data_dir)" in message
    assert "\n" not in message


@pytest.mark.parametrize(
    "trainer_args", [{}, {"limit_val_batches": 1.0}, {"limit_val_batches": 8}, {"limit_train_batches": 1}]
)
def test_a_limit_that_cuts_nothing_passes(trainer_args: dict) -> None:
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, **trainer_args)
    refuse_cut_loader(trainer, "val", 8, "the 2000 training images")
    refuse_cut_images(trainer, 256, [("val", 2000, "the bank"), ("val", 500, "the queries")])


# ----------------------------------------------------------------------------------------------------- bundled data
def test_bundled_fashion_mnist_subset() -> None:
    data = ImageFolderDataModule(str(BUNDLED), image_size=32, batch_size=500, num_workers=0)
    assert data.class_names == sorted(FASHION_CLASSES)
    assert len(data.train_dataset) == 2000 and len(data.val_dataset) == 500
    for dataset, per_class in ((data.train_dataset, 200), (data.val_dataset, 50)):
        assert np.bincount(dataset.targets).tolist() == [per_class] * 10
    with Image.open(data.train_dataset.samples[0][0]) as image:
        assert image.size == (28, 28) and image.mode == "L"
    images, labels = next(iter(data.val_dataloader()))
    assert images.shape == (500, 3, 32, 32) and labels.shape == (500,)
    total = sum(p.stat().st_size for p in BUNDLED.rglob("*") if p.is_file())
    assert total < 1_500_000, f"the bundled subset grew to {total} bytes"
    notice = (BUNDLED / "NOTICE").read_text()
    for needle in (
        "Zalando",
        "dataset-fashion-mnist",
        "MIT",
        "Permission is hereby granted",
        "make_subset.py",
    ):
        assert needle in notice


def _load_script():  # assets/ is not a package
    spec = importlib.util.spec_from_file_location("make_subset", BUNDLED / "make_subset.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


def test_make_subset_picks_first_images_per_class(tmp_path: Path) -> None:
    script = _load_script()
    source = tmp_path / "src"
    source.mkdir()
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 40), ("t10k", 30)):
        labels = rng.permutation(np.arange(n) % 10)
        images = rng.integers(0, 256, (n, 28, 28))
        _write_idx(source / f"{prefix}-labels-idx1-ubyte.gz", labels)
        _write_idx(source / f"{prefix}-images-idx3-ubyte.gz", images)
    out = tmp_path / "out"
    script.main(
        ["--source", str(source), "--out", str(out), "--train-per-class", "3", "--val-per-class", "2"]
    )
    for split, prefix, per_class in (("train", "train", 3), ("val", "t10k", 2)):
        labels = script.read_idx(source / f"{prefix}-labels-idx1-ubyte.gz")
        images = script.read_idx(source / f"{prefix}-images-idx3-ubyte.gz")
        for label, name in enumerate(FASHION_CLASSES):
            files = sorted((out / split / name).iterdir())
            expected = np.flatnonzero(labels == label)[:per_class]
            assert [int(f.stem) for f in files] == expected.tolist()
            for f, index in zip(files, expected, strict=True):
                assert np.array_equal(np.asarray(Image.open(f)), images[index])
    bad = tmp_path / "bad-idx1-ubyte"
    bad.write_bytes(b"\x00\x00\x0d\x01\x00\x00\x00\x01\x00")
    with pytest.raises(ValueError, match="not an unsigned-byte IDX file"):
        script.read_idx(bad)
    with pytest.raises(ValueError, match="class 0 has only 4 images, 5 requested"):
        script.main(["--source", str(source), "--out", str(out), "--train-per-class", "5"])
