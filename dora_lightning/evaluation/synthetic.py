"""Small synthetic stand-ins for DAVIS-2017, Pascal VOC 2012 and ADE20K, and a shape-classification set, built without
any download.

Textured shapes with exact masks are pasted on real frames of the bundled video (``assets/video/vtest.mp4``, read with
PyAV), and written in each data set's own folder layout, so that the evaluators' readers and protocols run unchanged on
them. Every shape class has a consistent look (class c: always the same shape family, base colour and texture), so a
frozen feature extractor can in principle tell the classes apart; sizes, positions, angles and colours jitter. The
shapes, their textures, masks and motion paths are drawn by :mod:`dora_lightning.evaluation.synthetic_shapes`; this module reads the
video frames and writes the data sets.

* :func:`make_davis_fixture`: DAVIS-2017 semi-supervised layout; objects move along smooth paths, occlude one another
  (fixed z-order per sequence) and may partly leave the frame.
* :func:`make_voc_fixture`: Pascal VOC 2012 segmentation layout, with VOC's 255 "void" band around every object.
* :func:`make_ade20k_fixture`: ADEChallengeData2016 layout (0 = "other", classes 1..C).
* :func:`make_shapes_fixture`: ImageFolder layout for k-NN / linear probes; the class is the shape's outline only.
* :func:`make_images_video`: the other way round, a video whose frames are the images of a labelled folder (one image
  per frame), to pretrain on the probe's own images: a check that pretraining learns anything at a given budget,
  independent of the domain gap between a video and a labelled set.

Command line: ``python -m dora_lightning.evaluation.synthetic {davis,voc,ade20k,shapes,images_video} --out PATH [--seed N ...]``.
Everything is deterministic for a given seed.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import NoReturn

import numpy as np
import torch
from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS

from dora_lightning.errors import exit_with_error
from dora_lightning.evaluation.palette import write_palette_png
from dora_lightning.evaluation.synthetic_shapes import (
    COLOURS,
    FAMILIES,
    TEXTURES,
    ShapeStyle,
    class_style,
    paint,
    paint_scene,
    random_shape,
    random_tracks,
    render_tracks,
    shape_mask,
    void_band,
)
from dora_lightning.evaluation.video_frames import DEFAULT_VIDEO, read_video_frames, video_frame_count

__all__ = [
    "COLOURS",
    "DEFAULT_VIDEO",
    "FAMILIES",
    "JPEG_QUALITY",
    "TEXTURES",
    "ShapeStyle",
    "class_style",
    "main",
    "make_ade20k_fixture",
    "make_davis_fixture",
    "make_images_video",
    "make_shapes_fixture",
    "make_voc_fixture",
    "read_video_frames",
    "video_frame_count",
]

JPEG_QUALITY = 92


# ------------------------------------------------------------------------------------------------ DAVIS
def make_davis_fixture(
    root: str | Path,
    sequences: int = 2,
    frames: int = 12,
    objects: int = 2,
    size: tuple[int, int] = (480, 640),  # (H, W); short side 480 as DAVIS 480p
    seed: int = 0,
    video: str | Path = DEFAULT_VIDEO,
) -> Path:
    """Write a DAVIS-2017 style semi-supervised data set of moving, occluding shapes and return ``root``.

    Layout: ``root/JPEGImages/480p/<seq>/00000.jpg ...``, ``root/Annotations/480p/<seq>/00000.png ...`` (palette PNGs
    with the DAVIS palette: 0 background, 1..objects the objects) and ``root/ImageSets/2017/val.txt`` (the sequence
    names; ``train.txt`` lists the same ones). Backgrounds are consecutive frames of ``video`` resized to ``size``
    (H, W); each sequence starts elsewhere in the video. Object k has the look of class k (:func:`class_style`); all
    objects are clearly visible in the first frame; later they cross, occlude one another (fixed random z-order per
    sequence) and may partly leave the frame.
    """
    if sequences < 1 or frames < 3 or objects < 1:
        raise ValueError(
            f"need sequences >= 1, frames >= 3 and objects >= 1, got {sequences}, {frames}, {objects}"
        )
    if objects > 254:
        raise ValueError(f"at most 254 objects per sequence (255 is void), got {objects}")
    root = Path(root)
    rng = np.random.default_rng(seed)
    names = [f"synth-{s:02d}" for s in range(sequences)]
    stride = max(1, video_frame_count(video) // sequences)
    starts = [int(s * stride + rng.integers(0, max(1, stride - frames))) for s in range(sequences)]
    backgrounds = read_video_frames(video, [s + t for s in starts for t in range(frames)], size)
    for name, start in zip(names, starts, strict=True):
        seq_rng = np.random.default_rng(rng.integers(0, 2**63))
        for _attempt in range(50):
            tracks = random_tracks(seq_rng, objects, size)
            z_order = [int(k) for k in seq_rng.permutation(objects)]
            _, first = render_tracks(backgrounds[start], tracks, z_order, 0.0, seq_rng)
            areas = [int((first == k + 1).sum()) for k in range(objects)]
            full = [math.pi * tr.shape.radius**2 * tr.shape.aspect * 0.3 for tr in tracks]
            if all(a >= f for a, f in zip(areas, full, strict=True)):
                break
        else:
            raise ValueError(
                f"could not place {objects} objects visibly in the first frame of {size}; use fewer objects"
            )
        image_dir = root / "JPEGImages" / "480p" / name
        mask_dir = root / "Annotations" / "480p" / name
        image_dir.mkdir(parents=True, exist_ok=True)
        mask_dir.mkdir(parents=True, exist_ok=True)
        for t in range(frames):
            image, labels = render_tracks(backgrounds[start + t], tracks, z_order, t / (frames - 1), seq_rng)
            Image.fromarray(image).save(image_dir / f"{t:05d}.jpg", quality=JPEG_QUALITY)
            write_palette_png(labels, mask_dir / f"{t:05d}.png")
    sets = root / "ImageSets" / "2017"
    sets.mkdir(parents=True, exist_ok=True)
    for split in ("val", "train"):
        (sets / f"{split}.txt").write_text("".join(f"{n}\n" for n in names))
    return root


# ------------------------------------------------------------------------------------------------ VOC / ADE20K
def _scenes(
    images: int, size: tuple[int, int], classes: int, seed: int, video: str | Path
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    if images < 2 or classes < 1:
        raise ValueError(f"need images >= 2 and classes >= 1, got images={images}, classes={classes}")
    if classes > 254:
        raise ValueError(f"at most 254 classes (255 is void), got {classes}")
    rng = np.random.default_rng(seed)
    step = max(1, video_frame_count(video) // images)
    indices = [i * step + int(rng.integers(0, step)) for i in range(images)]
    backgrounds = read_video_frames(video, indices, size)
    return [paint_scene(backgrounds[index], rng, i % classes + 1, classes) for i, index in enumerate(indices)]


def _is_val(i: int) -> bool:
    return i % 4 == 3  # every 4th image: ~25 % validation, every class in both splits


def make_voc_fixture(
    root: str | Path,
    images: int = 40,
    size: tuple[int, int] = (160, 224),
    classes: int = 4,
    seed: int = 0,
    video: str | Path = DEFAULT_VIDEO,
) -> Path:
    """Write a Pascal VOC 2012 style segmentation data set of textured shapes and return ``root``.

    Layout: ``root/JPEGImages/<id>.jpg``, ``root/SegmentationClass/<id>.png`` (palette PNGs: 0 background,
    1..classes, 255 "void" on a ~2 px band along every object boundary, as in VOC) and
    ``root/ImageSets/Segmentation/{train,val}.txt`` (every 4th image in val, ~75/25). Images are ``size`` (H, W).
    """
    root = Path(root)
    (root / "JPEGImages").mkdir(parents=True, exist_ok=True)
    (root / "SegmentationClass").mkdir(parents=True, exist_ok=True)
    splits: dict[str, list[str]] = {"train": [], "val": []}
    for i, (image, class_map, instances) in enumerate(_scenes(images, size, classes, seed, video)):
        image_id = f"2012_{i:06d}"
        labels = class_map.copy()
        labels[void_band(instances)] = 255
        Image.fromarray(image).save(root / "JPEGImages" / f"{image_id}.jpg", quality=JPEG_QUALITY)
        write_palette_png(labels, root / "SegmentationClass" / f"{image_id}.png")
        splits["val" if _is_val(i) else "train"].append(image_id)
    sets = root / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True, exist_ok=True)
    for split, ids in splits.items():
        (sets / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    return root


def make_ade20k_fixture(
    root: str | Path,
    images: int = 40,
    size: tuple[int, int] = (160, 224),
    classes: int = 4,
    seed: int = 0,
    video: str | Path = DEFAULT_VIDEO,
) -> Path:
    """Write an ADE20K (ADEChallengeData2016) style data set of textured shapes and return ``root``.

    Layout: ``root/images/{training,validation}/ADE_{train,val}_XXXXXXXX.jpg`` and
    ``root/annotations/{training,validation}/<same stem>.png`` (single-channel "L" PNGs: 0 "other" / ignored as in
    ADE20K, shape classes 1..classes). Every 4th image goes to validation (~75/25). Images are ``size`` (H, W).
    """
    root = Path(root)
    counters = {"training": 0, "validation": 0}
    for i, (image, class_map, _instances) in enumerate(_scenes(images, size, classes, seed, video)):
        split = "validation" if _is_val(i) else "training"
        counters[split] += 1
        stem = f"ADE_{'val' if split == 'validation' else 'train'}_{counters[split]:08d}"
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(root / "images" / split / f"{stem}.jpg", quality=JPEG_QUALITY)
        Image.fromarray(class_map, mode="L").save(root / "annotations" / split / f"{stem}.png")
    return root


# ------------------------------------------------------------------------------------------------ shapes (classification)
def make_shapes_fixture(
    root: str | Path,
    per_class_train: int = 100,
    per_class_val: int = 50,
    size: int = 64,
    seed: int = 0,
    video: str | Path = DEFAULT_VIDEO,
) -> Path:
    """Write an image-classification set in the video's own domain and return ``root``: one shape per image on a crop
    of a frame of ``video``; the class is the shape family (:data:`FAMILIES`: ellipse, rectangle, triangle, star).

    Colour and texture are drawn per image from all :data:`COLOURS` and :data:`TEXTURES` (independent of the class),
    as are the size (radius 18-34 % of the image), aspect, angle, position (centre within the middle third) and the
    background (a random square crop, 45-100 % of the frame's short side, of a random frame). So neither colour nor
    texture nor position tells the classes apart: only the outline does. Layout: ``root/{train,val}/<family>/NNNN.png``
    (the ImageFolder layout of the k-NN and linear evaluators), ``size`` x ``size`` RGB.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    count = len(FAMILIES) * (per_class_train + per_class_val)
    frame_count = video_frame_count(video)
    picks = rng.integers(0, frame_count, size=count)
    frames = read_video_frames(video, sorted(set(picks.tolist())), (288, 384))
    index = 0
    for split, per_class in (("train", per_class_train), ("val", per_class_val)):
        for family in FAMILIES:
            folder = root / split / family
            folder.mkdir(parents=True, exist_ok=True)
            for n in range(per_class):
                frame = frames[int(picks[index])]
                index += 1
                side = int(rng.uniform(0.45, 1.0) * min(frame.shape[:2]))
                top = int(rng.integers(0, frame.shape[0] - side + 1))
                left = int(rng.integers(0, frame.shape[1] - side + 1))
                crop = Image.fromarray(frame[top : top + side, left : left + side])
                image = np.array(crop.resize((size, size), Image.BILINEAR), dtype=np.uint8)
                style = ShapeStyle(
                    family,
                    COLOURS[int(rng.integers(len(COLOURS)))],
                    TEXTURES[int(rng.integers(len(TEXTURES)))],
                )
                centre = tuple(float(c) for c in rng.uniform(size / 3, 2 * size / 3, size=2))
                shape = replace(
                    random_shape(rng, 1, centre, float(rng.uniform(0.18, 0.34) * size)), style=style
                )
                paint(image, shape, shape_mask(shape, (size, size)), rng)
                Image.fromarray(image).save(folder / f"{n:04d}.png")
    return root


def make_images_video(
    images: str | Path, out: str | Path, count: int = 800, size: int = 96, fps: float = 10.0, seed: int = 0
) -> Path:
    """Write an H.264 MP4 whose frames are ``count`` images found under ``images`` (recursively, e.g. an ImageFolder
    split), drawn without replacement in a seeded random order, each resized to ``size`` x ``size`` (bilinear) and
    shown for one frame at ``fps``; return ``out``.

    Pretraining on such a video with ``method: dino`` is plain image DINO on those images (each frame gets its own
    views; a clip's T frames are T unrelated images), which tells whether a pretraining budget learns anything in the
    probe's own domain. Raises FileNotFoundError when ``images`` holds no images.
    """
    from dora_lightning.pictures import write_mp4

    folder = Path(images)
    files = (
        sorted(p for p in folder.rglob("*") if p.name.lower().endswith(IMG_EXTENSIONS))
        if folder.is_dir()
        else []
    )
    if not files:
        raise FileNotFoundError(
            f"--image_dir '{folder}': no images ({', '.join(IMG_EXTENSIONS)}) found under it"
        )
    order = np.random.default_rng(seed).permutation(len(files))[:count]
    frames = np.stack(
        [np.asarray(Image.open(files[i]).convert("RGB").resize((size, size), Image.BILINEAR)) for i in order]
    )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_mp4(torch.from_numpy(frames).permute(0, 3, 1, 2), out, fps)
    return out


# ------------------------------------------------------------------------------------------------ command line
PROG = "python -m dora_lightning.evaluation.synthetic"


class _OneLineParser(argparse.ArgumentParser):
    """argparse with the project's errors: ``PROG: error: MESSAGE (options: PROG --help)``, one line on stderr,
    exit status 2, no usage text."""

    def error(self, message: str) -> NoReturn:
        exit_with_error(self.prog, f"{message} (options: {self.prog} --help)")


def _fail(message: str) -> NoReturn:
    """A refused argument: one line on stderr naming the option, exit status 2."""
    exit_with_error(PROG, message)


def _check_counts(args: argparse.Namespace) -> None:
    """The counts of ``args.kind`` that its writer refuses, said with their command-line flags (the writers' own
    ValueErrors name their Python arguments and came as tracebacks)."""
    if args.kind == "davis":
        if args.sequences < 1:
            _fail(f"--sequences must be >= 1, got {args.sequences}")
        if args.frames < 3:
            _fail(
                f"--frames must be >= 3 (DAVIS scoring skips the first and the last frame), got {args.frames}"
            )
        if not 1 <= args.objects <= 254:
            _fail(f"--objects must be between 1 and 254 per sequence (255 is void), got {args.objects}")
    elif args.kind in ("voc", "ade20k"):
        if args.images < 2:
            _fail(f"--images must be >= 2, got {args.images}")
        if not 1 <= args.classes <= 254:
            _fail(f"--classes must be between 1 and 254 (255 is void), got {args.classes}")
    elif args.kind == "shapes":
        for flag, value in (
            ("--train_per_class", args.train_per_class),
            ("--val_per_class", args.val_per_class),
        ):
            if value < 1:
                _fail(f"{flag} must be >= 1, got {value}")
    for flag, value in (("--height", args.height), ("--width", args.width)):
        if value is not None and value < 1:
            _fail(f"{flag} must be >= 1, got {value}")


def main(argv: Sequence[str] | None = None) -> Path:
    """``python -m dora_lightning.evaluation.synthetic {davis,voc,ade20k,shapes,images_video} --out PATH [...]``: write a fixture (or
    the video), print and return its path. A refused argument is one line on stderr naming its flag, exit status 2."""
    parser = _OneLineParser(
        prog=PROG,
        description="Write a small synthetic DAVIS-2017, Pascal VOC 2012 or ADE20K data set, or a shape-classification "
        "set (no download).",
    )
    parser.add_argument("kind", choices=("davis", "voc", "ade20k", "shapes", "images_video"))
    parser.add_argument("--out", required=True, help="folder to write (created); images_video: the .mp4 file")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--video", default=DEFAULT_VIDEO, help="video whose frames become the backgrounds")
    parser.add_argument("--height", type=int, default=None, help="image height (davis: 480, voc/ade20k: 160)")
    parser.add_argument("--width", type=int, default=None, help="image width (davis: 640, voc/ade20k: 224)")
    parser.add_argument("--sequences", type=int, default=2, help="davis: number of sequences")
    parser.add_argument("--frames", type=int, default=12, help="davis: frames per sequence (>= 3)")
    parser.add_argument("--objects", type=int, default=2, help="davis: objects per sequence (1 to 254)")
    parser.add_argument("--images", type=int, default=40, help="voc/ade20k: number of images (>= 2)")
    parser.add_argument(
        "--classes", type=int, default=4, help="voc/ade20k: number of shape classes (1 to 254)"
    )
    parser.add_argument("--train_per_class", type=int, default=100, help="shapes: training images per class")
    parser.add_argument("--val_per_class", type=int, default=50, help="shapes: validation images per class")
    parser.add_argument(
        "--image_dir", default=None, help="images_video: folder of images (searched recursively)"
    )
    parser.add_argument("--count", type=int, default=800, help="images_video: number of images (frames)")
    parser.add_argument("--size", type=int, default=96, help="images_video: frame side in pixels")
    parser.add_argument("--fps", type=float, default=10.0, help="images_video: frame rate")
    args = parser.parse_args(argv)
    if args.kind == "images_video":
        if args.image_dir is None:
            _fail("images_video needs --image_dir, the folder whose images become the frames")
        try:
            path = make_images_video(args.image_dir, args.out, args.count, args.size, args.fps, args.seed)
        except FileNotFoundError as err:
            _fail(str(err))
        print(f"wrote a video of {min(args.count, video_frame_count(path))} images to {path}")
        return path
    default_size = {"davis": (480, 640), "shapes": (64, 64)}.get(args.kind, (160, 224))
    size = (args.height or default_size[0], args.width or default_size[1])
    if args.kind == "shapes" and size[0] != size[1]:
        _fail(f"shapes images are square: give --height and --width equal, got {size[0]} and {size[1]}")
    _check_counts(args)
    try:
        video_frame_count(args.video)
    except FileNotFoundError:
        _fail(f"--video '{args.video}' not found; give a readable video file (default {DEFAULT_VIDEO})")
    except ValueError as err:  # no decodable frame
        _fail(f"--video: {err}; give a readable video file (default {DEFAULT_VIDEO})")
    try:
        if args.kind == "davis":
            root = make_davis_fixture(
                args.out, args.sequences, args.frames, args.objects, size, args.seed, args.video
            )
        elif args.kind == "shapes":
            root = make_shapes_fixture(
                args.out, args.train_per_class, args.val_per_class, size[0], args.seed, args.video
            )
        elif args.kind == "voc":
            root = make_voc_fixture(args.out, args.images, size, args.classes, args.seed, args.video)
        else:
            root = make_ade20k_fixture(args.out, args.images, size, args.classes, args.seed, args.video)
    except ValueError as err:  # e.g. too many objects for the frame size; a frame the video cannot decode
        _fail(str(err))
    print(f"wrote {args.kind} fixture to {root}")
    return root


if __name__ == "__main__":
    main()
