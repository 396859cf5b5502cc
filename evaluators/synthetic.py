"""Small synthetic stand-ins for DAVIS-2017, Pascal VOC 2012 and ADE20K, built without any download.

Textured shapes with exact masks are pasted on real frames of the bundled video (``assets/video/vtest.mp4``, read with
PyAV), and written in each data set's own folder layout, so that the evaluators' readers and protocols run unchanged on
them. Every shape class has a consistent look (class c: always the same shape family, base colour and texture), so a
frozen feature extractor can in principle tell the classes apart; sizes, positions, angles and colours jitter.

* :func:`make_davis_fixture`: DAVIS-2017 semi-supervised layout; objects move along smooth paths, occlude one another
  (fixed z-order per sequence) and may partly leave the frame.
* :func:`make_voc_fixture`: Pascal VOC 2012 segmentation layout, with VOC's 255 "void" band around every object.
* :func:`make_ade20k_fixture`: ADEChallengeData2016 layout (0 = "other", classes 1..C).

Command line: ``python -m evaluators.synthetic {davis,voc,ade20k} --out DIR [--seed N ...]``.
Everything is deterministic for a given seed.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import av
import numpy as np
from PIL import Image, ImageDraw

from evaluators.davis_data import write_palette_png

__all__ = [
    "DEFAULT_VIDEO",
    "ShapeStyle",
    "class_style",
    "main",
    "make_ade20k_fixture",
    "make_davis_fixture",
    "make_voc_fixture",
    "read_video_frames",
    "video_frame_count",
]

DEFAULT_VIDEO = "assets/video/vtest.mp4"
_REPO = Path(__file__).resolve().parents[1]

FAMILIES = ("ellipse", "rectangle", "triangle", "star")
TEXTURES = ("stripes", "checker", "dots", "gradient")
COLOURS = ((220, 40, 40), (40, 190, 70), (50, 80, 230), (235, 205, 40),
           (210, 60, 210), (40, 200, 210), (240, 130, 30), (120, 60, 170))  # fmt: skip
JPEG_QUALITY = 92


@dataclass(frozen=True)
class ShapeStyle:
    """The fixed look of one class: shape ``family``, base ``colour`` (RGB) and ``texture``."""

    family: str
    colour: tuple[int, int, int]
    texture: str


def class_style(class_id: int) -> ShapeStyle:
    """The look of class ``class_id`` (1-based): families and textures cycle every 4 classes, colours every 8."""
    if class_id < 1:
        raise ValueError(f"class ids start at 1, got {class_id}")
    i = class_id - 1
    return ShapeStyle(FAMILIES[i % len(FAMILIES)], COLOURS[i % len(COLOURS)], TEXTURES[i % len(TEXTURES)])


# ------------------------------------------------------------------------------------------------ video frames
def _resolve_video(video: str | Path) -> Path:
    path = Path(video)
    if not path.is_absolute() and not path.exists() and (_REPO / path).exists():
        path = _REPO / path
    if not path.is_file():
        raise FileNotFoundError(
            f"video '{video}' not found; pass video= a readable video file (default {DEFAULT_VIDEO})"
        )
    return path


def video_frame_count(video: str | Path) -> int:
    """Number of frames of ``video`` (from the container, else by decoding it once)."""
    path = _resolve_video(video)
    with av.open(str(path)) as container:
        count = container.streams.video[0].frames
        if count <= 0:
            count = sum(1 for _ in container.decode(video=0))
    if count <= 0:
        raise ValueError(f"video '{path}' has no decodable frame")
    return int(count)


def read_video_frames(
    video: str | Path, indices: Sequence[int], size: tuple[int, int]
) -> dict[int, np.ndarray]:
    """Decode the frames ``indices`` of ``video`` (taken modulo its frame count) as RGB uint8 (H, W, 3) of ``size``.

    The video is decoded once, sequentially; frames are resized (bilinear) to ``size`` = (H, W). Returns
    ``{requested index: frame}``.
    """
    path = _resolve_video(video)
    count = video_frame_count(path)
    wanted = {int(i) for i in indices}
    frames: dict[int, np.ndarray] = {}
    with av.open(str(path)) as container:
        for position, frame in enumerate(container.decode(video=0)):
            hits = [i for i in wanted if i % count == position]
            if hits:
                image = frame.to_image().convert("RGB").resize((size[1], size[0]), Image.BILINEAR)
                frames.update({i: np.asarray(image, dtype=np.uint8) for i in hits})
            if len(frames) == len(wanted):
                break
    if len(frames) != len(wanted):
        raise ValueError(f"video '{path}': could not decode frame(s) {sorted(wanted - set(frames))[:5]}")
    return frames


# ------------------------------------------------------------------------------------------------ shapes
@dataclass(frozen=True)
class _Shape:
    """One shape instance in one image: where it is, how big, turned how far, and its look."""

    style: ShapeStyle
    centre: tuple[float, float]  # (x, y) in pixels
    radius: float
    aspect: float  # height / width of the shape before rotation
    angle: float  # radians
    tint: tuple[float, float, float]  # per-instance colour jitter
    phase: float  # texture phase


def _outline(shape: _Shape) -> list[tuple[float, float]]:
    """Polygon vertices (x, y) of a shape."""
    family = shape.style.family
    if family == "ellipse":
        t = np.linspace(0.0, 2 * math.pi, 48, endpoint=False)
        u, v = np.cos(t), shape.aspect * np.sin(t)
    elif family == "rectangle":
        u = np.array([-1.0, 1.0, 1.0, -1.0])
        v = shape.aspect * np.array([-1.0, -1.0, 1.0, 1.0]) * 0.8
        u = u * 0.8
    elif family == "triangle":
        t = np.array([-math.pi / 2, math.pi / 6, 5 * math.pi / 6])
        u, v = np.cos(t), shape.aspect * np.sin(t)
    elif family == "star":
        t = np.linspace(-math.pi / 2, 1.5 * math.pi, 10, endpoint=False)
        r = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
        u, v = r * np.cos(t), shape.aspect * r * np.sin(t)
    else:
        raise ValueError(f"unknown shape family {family!r}; expected one of {FAMILIES}")
    cos, sin = math.cos(shape.angle), math.sin(shape.angle)
    x = shape.centre[0] + shape.radius * (u * cos - v * sin)
    y = shape.centre[1] + shape.radius * (u * sin + v * cos)
    return list(zip(x.tolist(), y.tolist(), strict=True))


def _shape_mask(shape: _Shape, size: tuple[int, int]) -> np.ndarray:
    """Boolean (H, W) mask of the pixels the shape covers (clipped to the image)."""
    height, width = size
    canvas = Image.new("L", (width, height), 0)
    ImageDraw.Draw(canvas).polygon(_outline(shape), fill=1)
    return np.asarray(canvas, dtype=bool)


def _texture(shape: _Shape, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Texture intensity in [0, 1] at pixels (ys, xs), in the shape's own (rotating, scaling) coordinates."""
    cos, sin = math.cos(shape.angle), math.sin(shape.angle)
    dx, dy = (xs - shape.centre[0]) / shape.radius, (ys - shape.centre[1]) / shape.radius
    u, v = dx * cos + dy * sin, -dx * sin + dy * cos
    kind = shape.style.texture
    if kind == "stripes":
        return 0.5 + 0.5 * np.sin(2 * math.pi * (2.5 * u + shape.phase))
    if kind == "checker":
        return ((np.floor(3 * u + shape.phase) + np.floor(3 * v + shape.phase)) % 2).astype(np.float64)
    if kind == "dots":
        fu, fv = (3 * u + shape.phase) % 1.0 - 0.5, (3 * v + shape.phase) % 1.0 - 0.5
        return (fu**2 + fv**2 > 0.07).astype(np.float64)
    if kind == "gradient":
        return np.clip(0.5 + 0.5 * (u + v) / 1.5, 0.0, 1.0)
    raise ValueError(f"unknown texture {kind!r}; expected one of {TEXTURES}")


def _paint(image: np.ndarray, shape: _Shape, mask: np.ndarray, rng: np.random.Generator) -> None:
    """Paint the textured shape into ``image`` (H, W, 3 uint8) where ``mask`` is set."""
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        return
    level = 0.5 + 0.5 * _texture(shape, ys.astype(np.float64), xs.astype(np.float64))  # (n,)
    colour = np.asarray(shape.style.colour, dtype=np.float64) + np.asarray(shape.tint)
    pixels = level[:, None] * colour[None, :] + rng.normal(0.0, 6.0, size=(ys.size, 3))
    image[ys, xs] = np.clip(pixels, 0, 255).astype(np.uint8)


def _random_shape(
    rng: np.random.Generator, class_id: int, centre: tuple[float, float], radius: float
) -> _Shape:
    return _Shape(
        style=class_style(class_id),
        centre=centre,
        radius=radius,
        aspect=float(rng.uniform(0.65, 1.0)),
        angle=float(rng.uniform(0, 2 * math.pi)),
        tint=tuple(float(t) for t in rng.uniform(-20, 20, size=3)),  # type: ignore[arg-type]
        phase=float(rng.uniform(0, 1)),
    )


def _void_band(instances: np.ndarray) -> np.ndarray:
    """The ~2 px band along every boundary between different instances (both pixels of each differing pair)."""
    band = np.zeros(instances.shape, dtype=bool)
    for axis in (0, 1):
        differs = np.diff(instances, axis=axis) != 0
        before = [slice(None), slice(None)]
        after = [slice(None), slice(None)]
        before[axis], after[axis] = slice(None, -1), slice(1, None)
        band[tuple(before)] |= differs
        band[tuple(after)] |= differs
    return band


# ------------------------------------------------------------------------------------------------ DAVIS
@dataclass(frozen=True)
class _Track:
    """A moving object: its ``shape`` at t = 0, eased from ``start`` to ``end`` with a sideways wobble, spinning and
    breathing over the sequence."""

    shape: _Shape
    start: tuple[float, float]
    end: tuple[float, float]
    wobble: tuple[float, float]
    wobble_phase: float
    spin: float

    def at(self, t: float) -> _Shape:
        """The shape at normalised time ``t`` in [0, 1]."""
        s = 0.5 - 0.5 * math.cos(math.pi * t)  # ease in and out
        wave = math.sin(2 * math.pi * t + self.wobble_phase)
        x = self.start[0] + (self.end[0] - self.start[0]) * s + self.wobble[0] * wave
        y = self.start[1] + (self.end[1] - self.start[1]) * s + self.wobble[1] * wave
        breathe = 1.0 + 0.12 * math.sin(2 * math.pi * (t + self.shape.phase))
        return replace(
            self.shape,
            centre=(x, y),
            radius=self.shape.radius * breathe,
            angle=self.shape.angle + self.spin * t,
        )


def _tracks(rng: np.random.Generator, objects: int, size: tuple[int, int]) -> list[_Track]:
    """Paths that cross the frame in opposite directions (so objects pass in front of one another); some end partly
    outside the frame. Object k has the look of class k."""
    height, width = size
    tracks = []
    for k in range(objects):
        lane = (k // 2 + 0.5) / max(1, math.ceil(objects / 2))  # vertical lanes for pairs of objects
        y0 = height * (0.3 + 0.4 * lane + rng.uniform(-0.05, 0.05))
        y1 = height * (0.7 - 0.4 * lane + rng.uniform(-0.05, 0.05))
        x_near, x_far = width * rng.uniform(0.18, 0.3), width * rng.uniform(0.85, 1.02)
        x0, x1 = (width - x_near, width - x_far) if k % 2 else (x_near, x_far)  # odd objects go leftwards
        radius = min(height, width) * float(rng.uniform(0.13, 0.2))
        tracks.append(
            _Track(
                shape=_random_shape(rng, k + 1, (x0, y0), radius),
                start=(x0, y0),
                end=(x1, y1),
                wobble=(float(rng.uniform(-0.05, 0.05) * width), float(rng.uniform(0.03, 0.08) * height)),
                wobble_phase=float(rng.uniform(0, 2 * math.pi)),
                spin=float(rng.uniform(-1.5, 1.5)),
            )
        )
    return tracks


def _render_davis_frame(
    background: np.ndarray,
    tracks: Sequence[_Track],
    z_order: Sequence[int],
    t: float,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Paint the tracks at time ``t`` back to front: (RGB image, label map with object ids 1..K)."""
    image = background.copy()
    labels = np.zeros(background.shape[:2], dtype=np.uint8)
    for k in z_order:
        shape = tracks[k].at(t)
        mask = _shape_mask(shape, labels.shape)
        _paint(image, shape, mask, rng)
        labels[mask] = k + 1
    return image, labels


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
            tracks = _tracks(seq_rng, objects, size)
            z_order = [int(k) for k in seq_rng.permutation(objects)]
            _, first = _render_davis_frame(backgrounds[start], tracks, z_order, 0.0, seq_rng)
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
            image, labels = _render_davis_frame(
                backgrounds[start + t], tracks, z_order, t / (frames - 1), seq_rng
            )
            Image.fromarray(image).save(image_dir / f"{t:05d}.jpg", quality=JPEG_QUALITY)
            write_palette_png(labels, mask_dir / f"{t:05d}.png")
    sets = root / "ImageSets" / "2017"
    sets.mkdir(parents=True, exist_ok=True)
    for split in ("val", "train"):
        (sets / f"{split}.txt").write_text("".join(f"{n}\n" for n in names))
    return root


# ------------------------------------------------------------------------------------------------ VOC / ADE20K
def _scene(
    background: np.ndarray, rng: np.random.Generator, first_class: int, classes: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Paint 1-3 shapes (the first of class ``first_class``, others random) on ``background``.

    Returns (RGB image, class map 0..classes, instance map 0..n).
    """
    height, width = background.shape[:2]
    short = min(height, width)
    image = background.copy()
    class_map = np.zeros((height, width), dtype=np.uint8)
    instance_map = np.zeros((height, width), dtype=np.uint8)
    count = int(rng.integers(1, 4))
    class_ids = [first_class] + [int(c) for c in rng.integers(1, classes + 1, size=count - 1)]
    for n, class_id in enumerate(class_ids, start=1):
        radius = short * float(rng.uniform(0.18, 0.32))
        centre = (float(rng.uniform(0.15, 0.85) * width), float(rng.uniform(0.15, 0.85) * height))
        shape = _random_shape(rng, class_id, centre, radius)
        mask = _shape_mask(shape, (height, width))
        _paint(image, shape, mask, rng)
        class_map[mask] = class_id
        instance_map[mask] = n
    return image, class_map, instance_map


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
    return [_scene(backgrounds[index], rng, i % classes + 1, classes) for i, index in enumerate(indices)]


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
        labels[_void_band(instances)] = 255
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


# ------------------------------------------------------------------------------------------------ command line
def main(argv: Sequence[str] | None = None) -> Path:
    """``python -m evaluators.synthetic {davis,voc,ade20k} --out DIR [...]``: write a fixture, print and return its root."""
    parser = argparse.ArgumentParser(
        prog="python -m evaluators.synthetic",
        description="Write a small synthetic DAVIS-2017, Pascal VOC 2012 or ADE20K data set (no download).",
    )
    parser.add_argument("kind", choices=("davis", "voc", "ade20k"))
    parser.add_argument("--out", required=True, help="folder to write (created)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--video", default=DEFAULT_VIDEO, help="video whose frames become the backgrounds")
    parser.add_argument("--height", type=int, default=None, help="image height (davis: 480, voc/ade20k: 160)")
    parser.add_argument("--width", type=int, default=None, help="image width (davis: 640, voc/ade20k: 224)")
    parser.add_argument("--sequences", type=int, default=2, help="davis: number of sequences")
    parser.add_argument("--frames", type=int, default=12, help="davis: frames per sequence")
    parser.add_argument("--objects", type=int, default=2, help="davis: objects per sequence")
    parser.add_argument("--images", type=int, default=40, help="voc/ade20k: number of images")
    parser.add_argument("--classes", type=int, default=4, help="voc/ade20k: number of shape classes")
    args = parser.parse_args(argv)
    default_size = (480, 640) if args.kind == "davis" else (160, 224)
    size = (args.height or default_size[0], args.width or default_size[1])
    if args.kind == "davis":
        root = make_davis_fixture(
            args.out, args.sequences, args.frames, args.objects, size, args.seed, args.video
        )
    elif args.kind == "voc":
        root = make_voc_fixture(args.out, args.images, size, args.classes, args.seed, args.video)
    else:
        root = make_ade20k_fixture(args.out, args.images, size, args.classes, args.seed, args.video)
    print(f"wrote {args.kind} fixture to {root}")
    return root


if __name__ == "__main__":
    main()
