"""DAVIS data: the model's frame size, DINO's normalisation, one-line errors for malformed folders, sequence
selection, and the frames' split over processes and DataLoader workers (on a synthetic fixture, ``davis_root``, which
tests/test_davis.py shares)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from dora_lightning.evaluation.images import natural_key
from dora_lightning.evaluation.synthetic import make_davis_fixture
from evaluators.davis.data import (
    DAVIS_MEAN,
    DAVIS_STD,
    DavisFrames,
    davis_palette,
    model_size,
    read_frame,
    scan_davis,
)


@pytest.fixture(scope="module")
def davis_root(tmp_path_factory) -> Path:
    """2 sequences x 8 frames of 96x128 moving shapes."""
    return make_davis_fixture(tmp_path_factory.mktemp("davis"), sequences=2, frames=8, size=(96, 128), seed=1)


# ------------------------------------------------------------------------------------------------ data
def test_model_size_floors_to_the_patch_size():
    assert model_size(480, 854, 480, 16) == (480, 848)  # DINO (multiple of 64) would give 832
    assert model_size(854, 480, 480, 16) == (848, 480)
    assert model_size(480, 640, 64, 8) == (64, 80)
    assert model_size(480, 854, 480, 14) == (476, 840)


def test_read_frame_uses_dinos_normalisation(tmp_path):
    path = tmp_path / "grey.jpg"
    Image.fromarray(np.full((32, 48, 3), 128, dtype=np.uint8)).save(path, quality=100)
    frame = read_frame(path, (16, 24))
    assert frame.shape == (3, 16, 24)
    expected = [(128 / 255 - m) / s for m, s in zip(DAVIS_MEAN, DAVIS_STD, strict=True)]
    torch.testing.assert_close(frame.mean(dim=(1, 2)), torch.tensor(expected), atol=0.02, rtol=0)
    assert DAVIS_STD[0] == 0.228  # DINO's value, on purpose


def test_read_frame_scales_16_bit_images(tmp_path: Path) -> None:
    """Frames are read through the shared RGB conversion: a 16-bit image is scaled to 8 bits, not clipped to white."""
    path = tmp_path / "grey16.png"
    Image.fromarray(np.full((32, 48), 32896, dtype=np.uint16)).save(path)  # 32896 / 257 = 128
    frame = read_frame(path, (32, 48))
    expected = [(128 / 255 - m) / s for m, s in zip(DAVIS_MEAN, DAVIS_STD, strict=True)]
    torch.testing.assert_close(frame.mean(dim=(1, 2)), torch.tensor(expected), atol=1e-5, rtol=0)


def test_frames_run_in_natural_name_order(tmp_path: Path) -> None:
    """Unpadded names (0.jpg, 1.jpg, ..., 10.jpg, 11.jpg) ran as text sorts them (0, 1, 10, 11, 2, ...); now in
    number order, each frame still paired with the mask of its name."""
    root = make_davis_fixture(tmp_path / "d", sequences=1, frames=12, size=(32, 48), seed=2)
    frames, masks = root / "JPEGImages" / "480p" / "synth-00", root / "Annotations" / "480p" / "synth-00"
    originals = {i: (masks / f"{i:05d}.png").read_bytes() for i in range(12)}
    for i in range(12):
        (frames / f"{i:05d}.jpg").rename(frames / f"{i}.jpg")
        (masks / f"{i:05d}.png").rename(masks / f"{i}.png")
    (sequence,) = scan_davis(root)
    assert [p.stem for p in sequence.frames] == [str(i) for i in range(12)]
    assert [p.stem for p in sequence.masks] == [str(i) for i in range(12)]
    assert [p.read_bytes() for p in sequence.masks] == [originals[i] for i in range(12)]


def test_natural_key_keeps_zero_padded_order() -> None:
    padded = [Path(f"{i:05d}.jpg") for i in (7, 120, 0, 99, 3)]
    assert sorted(padded, key=natural_key) == sorted(padded)
    mixed = [Path(n) for n in ("b10.jpg", "a2.jpg", "b9.jpg", "a10.jpg", "01.jpg", "1.jpg")]
    assert [p.name for p in sorted(mixed, key=natural_key)] == [
        "01.jpg",
        "1.jpg",
        "a2.jpg",
        "a10.jpg",
        "b9.jpg",
        "b10.jpg",
    ]


def broken_copy(root: Path, tmp_path: Path, case: str) -> tuple[Path, str]:
    """A copy of the fixture broken in one way, and the message expected from scan_davis."""
    bad = tmp_path / case
    shutil.copytree(root, bad)
    seq = "synth-00"
    masks, frames = bad / "Annotations" / "480p", bad / "JPEGImages" / "480p"
    if case == "no_list":
        (bad / "ImageSets" / "2017" / "val.txt").unlink()
        return bad, "val.txt' not found"
    if case == "absent_sequence":
        (bad / "ImageSets" / "2017" / "val.txt").write_text("synth-00\nmissing-seq\n")
        return bad, "sequence 'missing-seq' is listed in"
    if case == "no_annotations":
        shutil.rmtree(bad / "Annotations")
        return bad, "Annotations/480p' not found"
    if case == "no_sequence_masks":
        shutil.rmtree(masks / seq)
        return bad, f"Annotations/480p/{seq}' not found"
    if case == "missing_mask":
        (masks / seq / "00003.png").unlink()
        return bad, "00003.png' not found"
    if case == "empty_sequence":
        for frame in (frames / seq).iterdir():
            frame.unlink()
        return bad, "holds no .jpg frame"
    if case == "size_mismatch":
        Image.open(masks / seq / "00002.png").resize((64, 48)).save(masks / seq / "00002.png")
        return bad, "00002.png' is 64x48 but its frame"
    if case == "not_palette":
        Image.open(masks / seq / "00001.png").convert("RGB").save(masks / seq / "00001.png")
        return bad, "00001.png' is a RGB image; DAVIS masks must be palette"
    if case == "listed_twice":
        (bad / "ImageSets" / "2017" / "val.txt").write_text("synth-00\nsynth-01\nsynth-00\n")
        return bad, "val.txt' lists sequence 'synth-00' more than once; list each sequence once"
    if case == "out_of_range":
        labels = np.asarray(Image.open(masks / seq / "00004.png")).copy()
        labels[0, 0] = 7
        image = Image.fromarray(labels, mode="P")
        image.putpalette(davis_palette())
        image.save(masks / seq / "00004.png")
        return bad, "00004.png' holds object id(s) [7] but the first frame has 2 object(s)"
    raise AssertionError(case)


@pytest.mark.parametrize(
    "case",
    [
        "no_list",
        "absent_sequence",
        "no_annotations",
        "no_sequence_masks",
        "missing_mask",
        "empty_sequence",
        "size_mismatch",
        "not_palette",
        "out_of_range",
        "listed_twice",
    ],
)
def test_malformed_folders_are_one_line_errors(case, davis_root, tmp_path):
    bad, message = broken_copy(davis_root, tmp_path, case)
    with pytest.raises((FileNotFoundError, ValueError)) as info:
        scan_davis(bad)
    text = str(info.value)
    assert message in text and "\n" not in text
    assert str(bad) in text  # names the file or folder


def test_scan_selects_sequences_and_refuses_unknown_ones(davis_root):
    (only,) = scan_davis(davis_root, sequences=["synth-01"])
    assert only.name == "synth-01" and len(only) == 8 and only.num_objects == 2 and only.size == (96, 128)
    with pytest.raises(ValueError, match="'nope'.*not listed in"):
        scan_davis(davis_root, sequences=["nope"])
    with pytest.raises(FileNotFoundError, match="python -m dora_lightning.evaluation.synthetic davis"):
        scan_davis(davis_root / "nowhere")


def test_fewer_sequences_than_processes_is_refused_in_one_line(davis_root):
    """A process without a sequence skipped the evaluation loop and its end, where the others waited for it in the
    gather of the scores (a hang)."""
    from dora_lightning.evaluation.contract import EvaluatorSettingError

    sequences = scan_davis(davis_root)  # 2
    with pytest.raises(EvaluatorSettingError, match="2 DAVIS sequence.s. cannot be shared by 3 processes"):
        DavisFrames(sequences, 64, 8, rank=0, world_size=3)
    assert len(DavisFrames(sequences, 64, 8, rank=1, world_size=2).own_sequences()) == 1


def test_frames_are_split_over_processes_and_workers_in_order(davis_root):
    sequences = scan_davis(davis_root)
    ranks = [DavisFrames(sequences, 64, 8, rank=r, world_size=2) for r in (0, 1)]
    assert [[s.name for s in d.own_sequences()] for d in ranks] == [["synth-00"], ["synth-01"]]
    assert [len(d) for d in ranks] == [8, 8]
    loader = DataLoader(DavisFrames(sequences, 64, 8), batch_size=None, num_workers=2)
    seen: dict[str, list[int]] = {}
    for item in loader:
        seen.setdefault(item["sequence"], []).append(item["index"])
        assert item["image"].shape == (3, 64, 80) and item["mask"].shape == (96, 128)
        assert ("grid_labels" in item) == (item["index"] == 0)
        assert item["num_objects"] == 2 and item["num_frames"] == 8
    assert seen == {"synth-00": list(range(8)), "synth-01": list(range(8))}
