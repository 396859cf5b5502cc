"""Write the bundled Fashion-MNIST subset: the first N train and M test images of each class, as ImageFolder PNGs.

Source: Zalando Research's Fashion-MNIST (MIT) as packaged by Debian (``dataset-fashion-mnist``)::

    cd /tmp && apt-get download dataset-fashion-mnist && dpkg-deb -x dataset-fashion-mnist_*.deb x
    python assets/fashion_mnist/make_subset.py --source /tmp/x/usr/share/datasets/fashion-mnist

The selection is deterministic: images are taken in file order, the first ``--train-per-class`` of each class from
``train-*`` and the first ``--val-per-class`` of each class from ``t10k-*`` (the official test split). Each image is
saved as an 8-bit grayscale 28x28 PNG named after its index in the source file:
``OUT/train/<class_name>/<index:05d>.png`` and ``OUT/val/<class_name>/<index:05d>.png``. Existing ``train/`` and
``val/`` folders under OUT are replaced. Only numpy and Pillow are needed.
"""

from __future__ import annotations

import argparse
import gzip
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

# Official label order of Fashion-MNIST (label k -> CLASS_NAMES[k]), lower-case with underscores.
CLASS_NAMES = (
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
)
SPLITS = {"train": "train", "val": "t10k"}  # output folder -> source file prefix
DEFAULT_SOURCE = "/usr/share/datasets/fashion-mnist"


def read_idx(path: Path) -> np.ndarray:
    """Read a (gzipped) big-endian unsigned-byte IDX file (magic 0x0000080N, N dims) into an array."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        data = fh.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"'{path}' is not an unsigned-byte IDX file (magic {data[:4].hex()})")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    offset = 4 + 4 * ndim
    count = int(np.prod(shape))
    if len(data) - offset != count:
        raise ValueError(
            f"'{path}': header says {shape} ({count} bytes) but {len(data) - offset} bytes follow"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(shape)


def _find(source: Path, prefix: str, kind: str) -> Path:
    for name in (f"{prefix}-{kind}-ubyte.gz", f"{prefix}-{kind}-ubyte"):
        if (source / name).is_file():
            return source / name
    raise FileNotFoundError(
        f"'{source / f'{prefix}-{kind}-ubyte.gz'}' not found; see this script's docstring"
    )


def select(labels: np.ndarray, per_class: int, num_classes: int = len(CLASS_NAMES)) -> list[int]:
    """Indices of the first ``per_class`` images of each class, in file order."""
    chosen: list[int] = []
    for label in range(num_classes):
        where = np.flatnonzero(labels == label)[:per_class]
        if len(where) < per_class:
            raise ValueError(f"class {label} has only {len(where)} images, {per_class} requested")
        chosen.extend(int(i) for i in where)
    return sorted(chosen)


def make_subset(source: Path, out: Path, per_class: dict[str, int]) -> dict[str, int]:
    """Write the subset; returns the number of images written per split."""
    written: dict[str, int] = {}
    for split, prefix in SPLITS.items():
        images = read_idx(_find(source, prefix, "images-idx3"))
        labels = read_idx(_find(source, prefix, "labels-idx1"))
        if images.ndim != 3 or labels.shape != (images.shape[0],):
            raise ValueError(f"{prefix}: images {images.shape} and labels {labels.shape} do not match")
        split_dir = out / split
        if split_dir.exists():
            shutil.rmtree(split_dir)
        for name in CLASS_NAMES:
            (split_dir / name).mkdir(parents=True)
        chosen = select(labels, per_class[split])
        for index in chosen:
            path = split_dir / CLASS_NAMES[labels[index]] / f"{index:05d}.png"
            Image.fromarray(images[index], mode="L").save(path, optimize=True)
        written[split] = len(chosen)
    return written


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--source", type=Path, default=Path(DEFAULT_SOURCE), help="folder of the *-idx*-ubyte.gz files"
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent, help="output folder")
    parser.add_argument("--train-per-class", type=int, default=200)
    parser.add_argument("--val-per-class", type=int, default=50)
    args = parser.parse_args(argv)
    written = make_subset(args.source, args.out, {"train": args.train_per_class, "val": args.val_per_class})
    print(f"wrote {written['train']} train and {written['val']} val images to {args.out}")


if __name__ == "__main__":
    main()
