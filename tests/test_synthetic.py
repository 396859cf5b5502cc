"""Synthetic DAVIS / VOC / ADE20K fixtures: layouts, mask formats, motion and occlusion, determinism, command line."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dora_lightning.evaluation.synthetic import (
    FAMILIES,
    class_style,
    main,
    make_ade20k_fixture,
    make_davis_fixture,
    make_shapes_fixture,
    make_voc_fixture,
)
from evaluators.davis.data import davis_palette


def digest(root: Path) -> str:
    """sha256 over every file's relative path and bytes."""
    sha = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        sha.update(str(path.relative_to(root)).encode())
        sha.update(path.read_bytes())
    return sha.hexdigest()


def labels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


@pytest.fixture(scope="module")
def davis(tmp_path_factory) -> Path:
    return make_davis_fixture(
        tmp_path_factory.mktemp("davis"), sequences=2, frames=10, objects=3, size=(120, 160), seed=0
    )


def test_davis_layout_and_masks(davis):
    names = (davis / "ImageSets" / "2017" / "val.txt").read_text().split()
    assert names == ["synth-00", "synth-01"]
    for name in names:
        frames = sorted((davis / "JPEGImages" / "480p" / name).glob("*.jpg"))
        masks = sorted((davis / "Annotations" / "480p" / name).glob("*.png"))
        assert [f.stem for f in frames] == [f"{i:05d}" for i in range(10)] == [m.stem for m in masks]
        first = Image.open(masks[0])
        assert first.mode == "P" and first.getpalette()[:12] == davis_palette()[:12]
        assert Image.open(frames[0]).size == first.size == (160, 120)
        assert set(np.unique(labels(masks[0]))) == {0, 1, 2, 3}  # every object visible in the first frame
        for mask in masks:
            assert set(np.unique(labels(mask))) <= {0, 1, 2, 3}


def test_davis_objects_move_occlude_and_leave_the_frame(davis):
    masks = [labels(p) for p in sorted((davis / "Annotations" / "480p" / "synth-00").glob("*.png"))]
    centroids = [np.argwhere(m == 1).mean(axis=0) for m in masks if (m == 1).any()]
    assert np.linalg.norm(centroids[-1] - centroids[0]) > 20  # object 1 travels
    steps = [np.linalg.norm(b - a) for a, b in zip(centroids, centroids[1:], strict=False)]
    assert max(steps) < 40  # ... smoothly
    areas = np.array([[(m == k).sum() for k in (1, 2, 3)] for m in masks])
    touching = 0
    for mask in masks:  # objects touch (one in front of the other) somewhere along the way
        for a in (1, 2, 3):
            grown = np.zeros_like(mask, dtype=bool)
            grown[1:] |= mask[:-1] == a
            grown[:-1] |= mask[1:] == a
            touching += int((grown & (mask != a) & (mask != 0)).any())
    assert touching > 0
    border = [m[0].any() or m[-1].any() or m[:, 0].any() or m[:, -1].any() for m in masks]
    assert any(border)  # some object reaches the frame edge (partly outside)
    assert (
        areas.max(axis=0) > 1.3 * areas.min(axis=0)
    ).any()  # visible areas change (occlusion, exits, scale)


def test_davis_backgrounds_are_video_frames(davis):
    frame = np.asarray(Image.open(davis / "JPEGImages" / "480p" / "synth-00" / "00000.jpg"), dtype=np.float64)
    background = labels(davis / "Annotations" / "480p" / "synth-00" / "00000.png") == 0
    assert frame[background].std() > 20  # a real street scene, not a flat colour
    other = np.asarray(Image.open(davis / "JPEGImages" / "480p" / "synth-01" / "00000.jpg"), dtype=np.float64)
    assert np.abs(frame - other).mean() > 5  # sequences start at different moments of the video


def test_fixtures_are_deterministic(tmp_path):
    kwargs = dict(sequences=1, frames=4, size=(48, 64))
    a = make_davis_fixture(tmp_path / "a", seed=5, **kwargs)
    b = make_davis_fixture(tmp_path / "b", seed=5, **kwargs)
    c = make_davis_fixture(tmp_path / "c", seed=6, **kwargs)
    assert digest(a) == digest(b) != digest(c)
    v1 = make_voc_fixture(tmp_path / "v1", images=8, size=(48, 64), seed=1)
    v2 = make_voc_fixture(tmp_path / "v2", images=8, size=(48, 64), seed=1)
    assert digest(v1) == digest(v2)


def test_class_styles_are_consistent():
    assert class_style(1) == class_style(1)
    assert len({class_style(c) for c in range(1, 9)}) == 8
    assert class_style(1).family == class_style(5).family and class_style(1).colour != class_style(5).colour
    with pytest.raises(ValueError, match="start at 1"):
        class_style(0)


def test_voc_layout_void_band_and_split(tmp_path):
    root = make_voc_fixture(tmp_path / "voc", images=20, size=(64, 96), classes=3, seed=0)
    train = (root / "ImageSets" / "Segmentation" / "train.txt").read_text().split()
    val = (root / "ImageSets" / "Segmentation" / "val.txt").read_text().split()
    assert len(train) == 15 and len(val) == 5 and not set(train) & set(val)
    seen: set[int] = set()
    for image_id in train + val:
        assert Image.open(root / "JPEGImages" / f"{image_id}.jpg").size == (96, 64)
        mask = Image.open(root / "SegmentationClass" / f"{image_id}.png")
        assert mask.mode == "P" and mask.size == (96, 64)
        values = labels(root / "SegmentationClass" / f"{image_id}.png")
        assert set(np.unique(values)) <= {0, 1, 2, 3, 255}
        assert (values == 255).any()  # every image has at least one object, outlined in void
        # the void band separates objects from the background: no object pixel touches a background pixel
        obj, bg = (values > 0) & (values < 255), values == 0
        assert not (obj[:, 1:] & bg[:, :-1]).any() and not (obj[:, :-1] & bg[:, 1:]).any()
        assert not (obj[1:] & bg[:-1]).any() and not (obj[:-1] & bg[1:]).any()
        seen |= set(np.unique(values).tolist())
    assert {1, 2, 3} <= seen


def test_ade20k_layout(tmp_path):
    root = make_ade20k_fixture(tmp_path / "ade", images=12, size=(64, 96), classes=4, seed=0)
    training = sorted((root / "images" / "training").glob("*.jpg"))
    validation = sorted((root / "images" / "validation").glob("*.jpg"))
    assert len(training) == 9 and len(validation) == 3
    assert training[0].name == "ADE_train_00000001.jpg" and validation[0].name == "ADE_val_00000001.jpg"
    for split, images in (("training", training), ("validation", validation)):
        for image in images:
            annotation = Image.open(root / "annotations" / split / f"{image.stem}.png")
            assert annotation.mode == "L" and annotation.size == (96, 64)
            assert set(np.unique(np.asarray(annotation))) <= {0, 1, 2, 3, 4}
            assert np.asarray(annotation).max() > 0


def test_command_line(tmp_path, capsys):
    root = main(["voc", "--out", str(tmp_path / "v"), "--images", "4", "--height", "32", "--width", "48"])
    assert (root / "ImageSets" / "Segmentation" / "val.txt").read_text().split() == ["2012_000003"]
    assert "wrote voc fixture" in capsys.readouterr().out
    main(
        [
            "davis",
            "--out",
            str(tmp_path / "d"),
            "--frames",
            "3",
            "--height",
            "48",
            "--width",
            "64",
            "--seed",
            "2",
        ]
    )
    assert len(list((tmp_path / "d" / "Annotations" / "480p" / "synth-01").glob("*.png"))) == 3
    main(["ade20k", "--out", str(tmp_path / "a"), "--images", "4", "--height", "32", "--width", "48"])
    assert len(list((tmp_path / "a" / "annotations" / "validation").glob("*.png"))) == 1


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError, match="frames >= 3"):
        make_davis_fixture(tmp_path, frames=2)
    with pytest.raises(FileNotFoundError, match="video 'nope.mp4' not found"):
        make_voc_fixture(tmp_path, video="nope.mp4")


PROG = "python -m dora_lightning.evaluation.synthetic"


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (
            ["davis", "--objects", "300"],
            "--objects must be between 1 and 254 per sequence (255 is void), got 300",
        ),
        (
            ["davis", "--frames", "2"],
            "--frames must be >= 3 (DAVIS scoring skips the first and the last frame), got 2",
        ),
        (
            ["davis", "--video", "/nope.mp4"],
            "--video '/nope.mp4' not found; give a readable video file (default assets/video/vtest.mp4)",
        ),
        (["voc", "--images", "1"], "--images must be >= 2, got 1"),
        (["ade20k", "--classes", "255"], "--classes must be between 1 and 254 (255 is void), got 255"),
        (
            ["davis", "--objects", "40", "--height", "48", "--width", "64"],
            "could not place 40 objects visibly in the first frame of (48, 64); use fewer objects",
        ),
        (
            ["shapes", "--height", "64", "--width", "32"],
            "shapes images are square: give --height and --width equal",
        ),
        (["images_video"], "images_video needs --image_dir, the folder whose images become the frames"),
        (["davis", "--nope", "1"], "unrecognized arguments: --nope 1 (options: " + PROG + " --help)"),
    ],
)
def test_a_refused_argument_is_one_line_naming_its_flag(argv, expected, tmp_path, capsys):
    """--objects 300, --frames 2 and a missing --video were tracebacks (exit status 1; the video's message said
    `video=`, the Python argument); argparse's own errors came with the usage text."""
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"{PROG}: error: {expected}"), err


def test_shapes_layout_and_only_the_outline_tells_classes_apart(tmp_path):
    root = make_shapes_fixture(tmp_path / "s", per_class_train=12, per_class_val=4, size=32, seed=0)
    for split, count in (("train", 12), ("val", 4)):
        assert sorted(p.name for p in (root / split).iterdir()) == sorted(FAMILIES)
        for family in FAMILIES:
            files = sorted((root / split / family).glob("*.png"))
            assert len(files) == count
            assert Image.open(files[0]).size == (32, 32) and Image.open(files[0]).mode == "RGB"
    # colour is not a class cue: mean colours of the classes overlap (per-image colours are drawn from all colours)
    means = {
        family: np.stack([np.asarray(Image.open(f), dtype=np.float64).mean(axis=(0, 1)) for f in
                          sorted((root / "train" / family).glob("*.png"))])
        for family in FAMILIES
    }  # fmt: skip
    spread = np.mean([m.std(axis=0).mean() for m in means.values()])
    between = np.stack([m.mean(axis=0) for m in means.values()]).std(axis=0).mean()
    assert between < spread
    again = make_shapes_fixture(tmp_path / "t", per_class_train=12, per_class_val=4, size=32, seed=0)
    assert digest(root) == digest(again)
    main(["shapes", "--out", str(tmp_path / "c"), "--train_per_class", "2", "--val_per_class", "1", "--height", "24",
          "--width", "24"])  # fmt: skip
    assert len(list((tmp_path / "c" / "val").glob("*/*.png"))) == len(FAMILIES)
    with pytest.raises(SystemExit):
        main(["shapes", "--out", str(tmp_path / "d"), "--height", "24", "--width", "32"])


def test_images_video_shows_each_image_for_one_frame(tmp_path):
    """images_video: `count` of the folder's images, one per frame, resized, in a seeded order; bad folders refused."""
    import av

    colours = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (40, 50, 210)}
    for name, colour in colours.items():
        (tmp_path / "imgs" / name).mkdir(parents=True)
        Image.new("RGB", (20, 28), colour).save(tmp_path / "imgs" / name / "0.png")

    def shown(seed: int) -> list[str]:
        """The colour name of each frame of the video written with ``seed``."""
        out = main(["images_video", "--image_dir", str(tmp_path / "imgs"), "--out", str(tmp_path / f"{seed}.mp4"),
                    "--count", "3", "--size", "32", "--fps", "5", "--seed", str(seed)])  # fmt: skip
        with av.open(str(out)) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        assert len(frames) == 3 and frames[0].shape == (32, 32, 3)
        names = []
        for (
            frame
        ) in frames:  # each frame is one of the images, nearly uniform in its colour (H.264 at crf 18)
            distance = {n: np.abs(frame.reshape(-1, 3).mean(0) - c).max() for n, c in colours.items()}
            names.append(min(distance, key=distance.get))
            assert distance[names[-1]] < 20
        return names

    order = shown(0)
    assert sorted(order) == sorted(colours)  # every image once
    assert shown(0) == order  # the same order for a seed
    assert {tuple(shown(seed)) for seed in range(1, 6)} != {tuple(order)}  # other seeds, other orders
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit):
        main(["images_video", "--image_dir", str(tmp_path / "empty"), "--out", str(tmp_path / "x.mp4")])
    with pytest.raises(SystemExit):
        main(["images_video", "--out", str(tmp_path / "x.mp4")])


def test_the_default_video_is_found_from_any_working_directory(tmp_path, monkeypatch):
    """The default background video is a path relative to the repository; it resolves from elsewhere too (it did not
    after the module moved into dora_lightning/evaluation/: the repository root was computed one level short)."""
    from dora_lightning.evaluation.video_frames import DEFAULT_VIDEO, read_video_frames, video_frame_count

    monkeypatch.chdir(tmp_path)
    count = video_frame_count(DEFAULT_VIDEO)
    assert count > 100
    (frame,) = read_video_frames(DEFAULT_VIDEO, [count + 3], (24, 32)).values()
    assert frame.shape == (24, 32, 3) and frame.dtype == np.uint8
