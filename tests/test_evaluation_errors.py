"""Bad evaluation data: EvaluationDataError from the readers, and `dora validate --evaluator` reporting it in one line."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
from PIL import Image
from test_knn import write_image_folder
from test_validate_cli import QUIET, exported_teacher  # noqa: F401 - fixture
from torch.utils.data import DataLoader, Dataset

from dora_lightning.cli import main
from dora_lightning.errors import one_line
from dora_lightning.evaluation.contract import EvaluationDataError, EvaluationDataNotFoundError, Evaluator
from dora_lightning.evaluation.image_data import ImageFolderDataModule
from dora_lightning.evaluation.synthetic import make_davis_fixture, make_voc_fixture
from evaluators.davis.data import scan_davis
from evaluators.segmentation.data import SegmentationDataModule


class Raising(Evaluator):
    """An evaluator whose evaluate() raises ``error`` (``data``: an EvaluationDataError, else a RuntimeError)."""

    name: ClassVar[str] = "raising"

    def __init__(self, error: str = "data", image_size: int = 32) -> None:
        super().__init__(image_size=image_size)
        self.error = error

    def evaluate(self, backbone: Any, trainer_kwargs: dict[str, Any]) -> dict[str, float]:
        if self.error == "data":
            raise EvaluationDataError("'/data/x.png' is broken; restore it")
        raise RuntimeError("a bug, not a data problem")


def validate(args: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """Run `dora validate ARGS`, expecting it to exit; return (exit status, stderr)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["validate", *args, *QUIET, f"--trainer.default_root_dir={tmp_path}"])
    return exit_info.value.code, capsys.readouterr().err


def assert_one_line_error(status: int, err: str, name: str, *fragments: str) -> None:
    assert status not in (0, None)
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"dora validate: error: --evaluator {name}: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0]


# ------------------------------------------------------------------------------------------------ end to end
def test_knn_without_val_split(exported_teacher, tmp_path, capsys):  # noqa: F811
    data = write_image_folder(tmp_path / "images", train_per_class=1, val_per_class=1, size=8)
    shutil.rmtree(data / "val")
    status, err = validate(
        [
            "--evaluator=knn",
            f"--ckpt_path={exported_teacher}",
            "--evaluator.image_size=32",
            f"--evaluator.data_dir={data}",
        ],
        tmp_path,
        capsys,
    )
    assert_one_line_error(status, err, "knn", f"'{data / 'val'}' does not exist or is not a folder")
    assert not (tmp_path / "eval" / "knn" / "results_knn.json").exists()


def test_davis_without_annotations(exported_teacher, tmp_path, capsys):  # noqa: F811
    data = make_davis_fixture(tmp_path / "davis", sequences=1, frames=3, objects=1, size=(32, 48))
    shutil.rmtree(data / "Annotations" / "480p")
    status, err = validate(
        [
            "--evaluator=davis",
            f"--ckpt_path={exported_teacher}",
            "--evaluator.short_side=32",
            f"--evaluator.data_dir={data}",
        ],
        tmp_path,
        capsys,
    )
    assert_one_line_error(status, err, "davis", f"'{data / 'Annotations' / '480p'}' not found")


@pytest.fixture
def voc(tmp_path: Path) -> Path:
    return make_voc_fixture(tmp_path / "voc", images=4, size=(32, 48), classes=2)


def test_segmentation_without_masks(voc, exported_teacher, tmp_path, capsys):  # noqa: F811
    shutil.rmtree(voc / "SegmentationClass")
    status, err = validate(
        [
            "--evaluator=segmentation",
            f"--ckpt_path={exported_teacher}",
            "--evaluator.image_size=32",
            f"--evaluator.data_dir={voc}",
        ],
        tmp_path,
        capsys,
    )
    assert_one_line_error(status, err, "segmentation", f"'{voc / 'SegmentationClass'}' is missing")


def test_segmentation_mask_of_the_wrong_mode(voc, exported_teacher, tmp_path, capsys):  # noqa: F811
    mask = sorted((voc / "SegmentationClass").glob("*.png"))[0]
    Image.open(mask).convert("RGB").save(mask)
    status, err = validate(
        [
            "--evaluator=segmentation",
            f"--ckpt_path={exported_teacher}",
            "--evaluator.image_size=32",
            f"--evaluator.data_dir={voc}",
        ],
        tmp_path,
        capsys,
    )
    assert_one_line_error(status, err, "segmentation", f"mask '{mask}' has PIL mode 'RGB'")


def test_only_data_errors_are_shortened(exported_teacher, tmp_path, capsys):  # noqa: F811
    plugin = f"{__name__}:Raising"
    status, err = validate([f"--evaluator={plugin}", f"--ckpt_path={exported_teacher}"], tmp_path, capsys)
    assert_one_line_error(status, err, "raising", "'/data/x.png' is broken; restore it")
    with pytest.raises(RuntimeError, match="a bug, not a data problem"):
        main(
            [
                "validate",
                f"--evaluator={plugin}",
                "--evaluator.error=bug",
                f"--ckpt_path={exported_teacher}",
                *QUIET,
                f"--trainer.default_root_dir={tmp_path}",
            ]
        )


# ------------------------------------------------------------------------------------------------ the readers
def test_readers_raise_evaluation_data_errors(tmp_path: Path) -> None:
    images = write_image_folder(tmp_path / "images", train_per_class=1, val_per_class=1, size=8)
    shutil.rmtree(images / "val")
    with pytest.raises(EvaluationDataNotFoundError, match="does not exist"):
        ImageFolderDataModule(str(images)).setup()
    write_image_folder(images, train_per_class=1, val_per_class=1, size=8)
    notes = images / "train" / "blue" / "notes.txt"
    notes.write_text("not an image")
    with pytest.raises(EvaluationDataError, match=f"'{notes}' is not an image file"):
        ImageFolderDataModule(str(images)).setup()

    davis = make_davis_fixture(tmp_path / "davis", sequences=1, frames=3, objects=1, size=(32, 48))
    shutil.rmtree(davis / "Annotations" / "480p")
    with pytest.raises(FileNotFoundError) as info:  # still a FileNotFoundError, and a ValueError
        scan_davis(davis)
    assert isinstance(info.value, EvaluationDataNotFoundError) and isinstance(info.value, ValueError)

    voc = make_voc_fixture(tmp_path / "voc", images=4, size=(32, 48), classes=2)
    first_val = (voc / "ImageSets" / "Segmentation" / "val.txt").read_text().split()[0]
    mask = voc / "SegmentationClass" / f"{first_val}.png"
    Image.fromarray(np.full((32, 48), 9, dtype=np.uint8), mode="L").save(mask)
    data = SegmentationDataModule(str(voc), num_classes=3, image_size=32, patch_size=8, num_workers=0)
    data.setup()  # headers only: the label range is checked when the sample is loaded
    assert data.val_dataset is not None
    with pytest.raises(EvaluationDataError, match=f"mask '{mask}' holds label values 9 outside 0..2"):
        data.val_dataset[0]


class _BadSample(Dataset):
    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int) -> Any:
        raise EvaluationDataNotFoundError("'/data/img.jpg' not found; restore it")


def test_an_error_from_a_dataloader_worker_staysone_line() -> None:
    """A worker's error comes back with the worker's traceback in its message; the CLI keeps the original line."""
    with pytest.raises(EvaluationDataNotFoundError) as info:
        next(iter(DataLoader(_BadSample(), num_workers=1)))
    assert "Traceback" in str(info.value)
    assert one_line(info.value) == "'/data/img.jpg' not found; restore it"
    assert one_line(EvaluationDataError("one line")) == "one line"
