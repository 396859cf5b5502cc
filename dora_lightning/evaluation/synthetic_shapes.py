"""Shape drawing for the synthetic fixtures of :mod:`dora_lightning.evaluation.synthetic`: class looks, textured shapes, exact masks,
motion paths, occluding DAVIS frames and VOC/ADE20K scenes.

Every shape class has a consistent look (:func:`class_style`: class c is always the same shape family, base colour and
texture); sizes, positions, angles, colours and texture phases jitter per instance. All drawing takes an explicit
``numpy.random.Generator``, so the fixture writers are deterministic for a seed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "COLOURS",
    "FAMILIES",
    "TEXTURES",
    "Shape",
    "ShapeStyle",
    "Track",
    "class_style",
    "outline",
    "paint",
    "paint_scene",
    "random_shape",
    "random_tracks",
    "render_tracks",
    "shape_mask",
    "texture",
    "void_band",
]

FAMILIES = ("ellipse", "rectangle", "triangle", "star")
TEXTURES = ("stripes", "checker", "dots", "gradient")
COLOURS = ((220, 40, 40), (40, 190, 70), (50, 80, 230), (235, 205, 40),
           (210, 60, 210), (40, 200, 210), (240, 130, 30), (120, 60, 170))  # fmt: skip


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


# ------------------------------------------------------------------------------------------------ shapes
@dataclass(frozen=True)
class Shape:
    """One shape instance in one image: where it is, how big, turned how far, and its look."""

    style: ShapeStyle
    centre: tuple[float, float]  # (x, y) in pixels
    radius: float
    aspect: float  # height / width of the shape before rotation
    angle: float  # radians
    tint: tuple[float, float, float]  # per-instance colour jitter
    phase: float  # texture phase


def outline(shape: Shape) -> list[tuple[float, float]]:
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


def shape_mask(shape: Shape, size: tuple[int, int]) -> np.ndarray:
    """Boolean (H, W) mask of the pixels the shape covers (clipped to the image)."""
    height, width = size
    canvas = Image.new("L", (width, height), 0)
    ImageDraw.Draw(canvas).polygon(outline(shape), fill=1)
    return np.asarray(canvas, dtype=bool)


def texture(shape: Shape, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
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


def paint(image: np.ndarray, shape: Shape, mask: np.ndarray, rng: np.random.Generator) -> None:
    """Paint the textured shape into ``image`` (H, W, 3 uint8) where ``mask`` is set (pixel noise from ``rng``)."""
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        return
    level = 0.5 + 0.5 * texture(shape, ys.astype(np.float64), xs.astype(np.float64))  # (n,)
    colour = np.asarray(shape.style.colour, dtype=np.float64) + np.asarray(shape.tint)
    pixels = level[:, None] * colour[None, :] + rng.normal(0.0, 6.0, size=(ys.size, 3))
    image[ys, xs] = np.clip(pixels, 0, 255).astype(np.uint8)


def random_shape(
    rng: np.random.Generator, class_id: int, centre: tuple[float, float], radius: float
) -> Shape:
    """A shape of class ``class_id`` at ``centre`` with ``radius``; aspect, angle, tint and phase drawn from ``rng``."""
    return Shape(
        style=class_style(class_id),
        centre=centre,
        radius=radius,
        aspect=float(rng.uniform(0.65, 1.0)),
        angle=float(rng.uniform(0, 2 * math.pi)),
        tint=tuple(float(t) for t in rng.uniform(-20, 20, size=3)),  # type: ignore[arg-type]
        phase=float(rng.uniform(0, 1)),
    )


def void_band(instances: np.ndarray) -> np.ndarray:
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


# ------------------------------------------------------------------------------------------------ motion (DAVIS)
@dataclass(frozen=True)
class Track:
    """A moving object: its ``shape`` at t = 0, eased from ``start`` to ``end`` with a sideways wobble, spinning and
    breathing over the sequence."""

    shape: Shape
    start: tuple[float, float]
    end: tuple[float, float]
    wobble: tuple[float, float]
    wobble_phase: float
    spin: float

    def at(self, t: float) -> Shape:
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


def random_tracks(rng: np.random.Generator, objects: int, size: tuple[int, int]) -> list[Track]:
    """Paths that cross the frame of ``size`` (H, W) in opposite directions (so objects pass in front of one
    another); some end partly outside the frame. Object k has the look of class k."""
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
            Track(
                shape=random_shape(rng, k + 1, (x0, y0), radius),
                start=(x0, y0),
                end=(x1, y1),
                wobble=(float(rng.uniform(-0.05, 0.05) * width), float(rng.uniform(0.03, 0.08) * height)),
                wobble_phase=float(rng.uniform(0, 2 * math.pi)),
                spin=float(rng.uniform(-1.5, 1.5)),
            )
        )
    return tracks


def render_tracks(
    background: np.ndarray,
    tracks: Sequence[Track],
    z_order: Sequence[int],
    t: float,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Paint the tracks at time ``t`` back to front: (RGB image, label map with object ids 1..K)."""
    image = background.copy()
    labels = np.zeros(background.shape[:2], dtype=np.uint8)
    for k in z_order:
        shape = tracks[k].at(t)
        mask = shape_mask(shape, labels.shape)
        paint(image, shape, mask, rng)
        labels[mask] = k + 1
    return image, labels


# ------------------------------------------------------------------------------------------------ scenes (VOC / ADE20K)
def paint_scene(
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
        shape = random_shape(rng, class_id, centre, radius)
        mask = shape_mask(shape, (height, width))
        paint(image, shape, mask, rng)
        class_map[mask] = class_id
        instance_map[mask] = n
    return image, class_map, instance_map
