"""Create ``photo_walk.mp4``: a camera "walking" across many real photographs, one scene after another.

A video whose views really differ, for pretraining at demo scale: the bundled street video is one fixed camera on one
walkway, so every clip shows much the same picture. Here each photograph is one scene: a 4:3 camera window pans across
it and zooms slowly for ``seconds_per_photo`` seconds (continuous motion, as a walk), then the video cuts to the next
photograph; the photographs come in a seeded order and the video passes over all of them ``passes`` times, each pass
with fresh camera paths. The photographs are the CC-BY, CC-BY-SA and CC0 images of Debian's wallpaper packages; see
``assets/video/NOTICE`` for which files and their licences.

Usage::

    apt-get install ukui-wallpapers lomiri-wallpapers   # Debian 12 / 13
    python assets/video/photo_walk.py assets/video/photo_walk.mp4 /usr/share/backgrounds
"""

from __future__ import annotations

import argparse
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image

PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png")


def find_photos(folders: list[str]) -> list[Path]:
    """The photographs directly in ``folders`` (not recursive, no symbolic links: a package's "default background"
    link repeats one of its photos), sorted by name, de-duplicated by file name."""
    found: dict[str, Path] = {}
    for folder in folders:
        for path in sorted(Path(folder).iterdir()):
            if (
                path.suffix.lower() in PHOTO_SUFFIXES
                and not path.is_symlink()
                and path.stat().st_size > 50_000
            ):
                found.setdefault(path.name, path)
    if not found:
        raise SystemExit(f"error: no .jpg/.png photographs in {folders}")
    return [found[name] for name in sorted(found)]


def camera_path(
    image_size: tuple[int, int], aspect: float, frames: int, rng: np.random.Generator
) -> np.ndarray:
    """(frames, 4) crop boxes (x0, y0, x1, y1): a 4:3 window that pans linearly and zooms between two random views."""
    width, height = image_size
    ends = []
    for _ in range(2):
        scale = rng.uniform(0.35, 0.8)  # window height as a fraction of the largest 4:3 window that fits
        box_h = scale * min(height, width / aspect)
        box_w = box_h * aspect
        x0 = rng.uniform(0, width - box_w)
        y0 = rng.uniform(0, height - box_h)
        ends.append((x0, y0, x0 + box_w, y0 + box_h))
    t = np.linspace(0.0, 1.0, frames)[:, None]
    return (1 - t) * np.asarray(ends[0]) + t * np.asarray(ends[1])


def make_photo_walk(
    photos: list[Path],
    target: str | Path,
    width: int = 320,
    height: int = 240,
    fps: int = 10,
    seconds_per_photo: float = 4.0,
    passes: int = 1,
    seed: int = 0,
    gop: int = 10,
    crf: int = 28,
) -> int:
    """Write the walk to ``target`` (H.264, yuv420p, ``gop``-frame GOP); returns the number of frames written."""
    rng = np.random.default_rng(seed)
    frames_per_photo = max(2, round(seconds_per_photo * fps))
    written = 0
    with av.open(str(target), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": str(crf), "preset": "slow", "g": str(gop), "keyint_min": str(gop),
                          "sc_threshold": "0"}  # fmt: skip
        container.metadata["comment"] = (
            "dora-lightning photo walk over Debian wallpaper photographs (assets/video/NOTICE)"
        )
        for _ in range(passes):
            for index in rng.permutation(len(photos)).tolist():
                image = Image.open(photos[index]).convert("RGB")
                for box in camera_path(image.size, width / height, frames_per_photo, rng):
                    view = image.resize((width, height), Image.Resampling.BILINEAR, box=tuple(box),
                                        reducing_gap=2.0)  # fmt: skip
                    frame = av.VideoFrame.from_ndarray(np.asarray(view), format="rgb24")
                    for packet in stream.encode(frame):
                        container.mux(packet)
                    written += 1
        for packet in stream.encode():
            container.mux(packet)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("target")
    parser.add_argument("folders", nargs="+", help="folders of photographs")
    parser.add_argument("--width", type=int, default=320)
    parser.add_argument("--height", type=int, default=240)
    parser.add_argument("--fps", type=int, default=10)
    parser.add_argument("--seconds_per_photo", type=float, default=4.0)
    parser.add_argument("--passes", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--exclude", nargs="*", default=[], help="file names to leave out")
    args = parser.parse_args()
    photos = [p for p in find_photos(args.folders) if p.name not in set(args.exclude)]
    frames = make_photo_walk(
        photos, args.target, args.width, args.height, args.fps, args.seconds_per_photo, args.passes, args.seed
    )
    print(f"wrote {args.target}: {frames} frames from {len(photos)} photographs")
    for photo in photos:
        print(f"  {photo}")


if __name__ == "__main__":
    main()
