"""Reading DAVIS-2017 (semi-supervised, 480p) for the label-propagation evaluator (spec D); see docs/evaluation.md.

Layout (as downloaded from davischallenge.org, "TrainVal - Images and Annotations (480p)")::

    ROOT/JPEGImages/480p/<sequence>/00000.jpg, 00001.jpg, ...
    ROOT/Annotations/480p/<sequence>/00000.png, 00001.png, ...   palette PNGs: 0 background, 1..K objects
    ROOT/ImageSets/2017/val.txt (train.txt)                      one sequence name per line

A sequence's frames are its ``.jpg`` files in natural name order (:func:`~dora_lightning.evaluation.images.natural_key`: ``2.jpg`` before ``10.jpg``;
DAVIS's zero-padded names sort as text does), each paired with the mask of the same stem.

:func:`scan_davis` checks the layout and the masks once, before any frame is read, and :class:`DavisFrames` streams
the frames of the sequences in order (one whole sequence per dataloader worker and per process), each frame resized for the
backbone and normalised, together with its ground-truth mask at the original size.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.data import IterableDataset, get_worker_info

from dora_lightning.evaluation.contract import (
    EvaluationDataError,
    EvaluationDataNotFoundError,
    EvaluatorSettingError,
)
from dora_lightning.evaluation.image_data import rgb_image
from dora_lightning.evaluation.images import image_header, natural_key
from dora_lightning.evaluation.palette import davis_palette, write_palette_png
from dora_lightning.imagenet import IMAGENET_MEAN

__all__ = [
    "DAVIS_MEAN",
    "DAVIS_STD",
    "DavisFrames",
    "DavisSequence",
    "count_objects",
    "davis_palette",
    "grid_labels",
    "model_size",
    "patch_grid",
    "read_frame",
    "read_mask",
    "scan_davis",
    "write_palette_png",
]

# DINO's eval_video_segmentation.py normalises with std 0.228 for red (torchvision/ImageNet use 0.229); we follow DINO
# so that numbers compare with the published ones.
DAVIS_MEAN = IMAGENET_MEAN
DAVIS_STD = (0.228, 0.224, 0.225)
MAX_OBJECTS = 254  # label 255 is "void" in the DAVIS/VOC palette convention
_HOW_TO = (
    "download DAVIS-2017 TrainVal 480p from https://davischallenge.org/davis2017/code.html or generate a fixture "
    "with `python -m dora_lightning.evaluation.synthetic davis --out DIR` (see docs/evaluation.md)"
)


@dataclass(frozen=True)
class DavisSequence:
    """One sequence: ``name``, frame and mask files (same order and stems), frame ``size`` (H, W) and ``num_objects``
    (K, the largest object id of the first frame's mask)."""

    name: str
    frames: tuple[Path, ...]
    masks: tuple[Path, ...]
    size: tuple[int, int]
    num_objects: int

    def __len__(self) -> int:
        return len(self.frames)


def _header_hw(path: Path) -> tuple[str, tuple[int, int]]:
    """(PIL mode, (H, W)) of an image file: the shared header reader, in the (H, W) order of DAVIS sizes."""
    mode, (width, height) = image_header(path)
    return mode, (height, width)


def _check_mask_mode(path: Path, mode: str) -> None:
    if mode not in ("P", "L"):
        raise EvaluationDataError(
            f"'{path}' is a {mode} image; DAVIS masks must be palette ('P') PNGs of object indices "
            "(0 background, 1..K objects, 255 void); re-save it as a palette PNG"
        )


def _read_sequence_list(list_file: Path) -> list[str]:
    if not list_file.is_file():
        raise EvaluationDataNotFoundError(
            f"'{list_file}' not found: the list of the {list_file.stem} sequences of ImageSets/2017; {_HOW_TO}"
        )
    names = [line.strip() for line in list_file.read_text().splitlines() if line.strip()]
    if not names:
        raise EvaluationDataError(f"'{list_file}' lists no sequence; put one sequence name per line")
    counts = Counter(names)
    twice = [name for name, count in counts.items() if count > 1]
    if twice:
        raise EvaluationDataError(
            f"'{list_file}' lists sequence '{twice[0]}' more than once"
            + (f" (and {len(twice) - 1} more sequence(s))" if len(twice) > 1 else "")
            + "; list each sequence once"
        )
    return names


def _scan_sequence(name: str, image_root: Path, mask_root: Path, list_file: Path) -> DavisSequence:
    frame_dir, mask_dir = image_root / name, mask_root / name
    if not frame_dir.is_dir():
        raise EvaluationDataNotFoundError(
            f"sequence '{name}' is listed in '{list_file}' but '{frame_dir}' does not exist; "
            "restore the sequence's frames or remove it from the list"
        )
    frames = sorted(
        (p for p in frame_dir.iterdir() if p.suffix.lower() == ".jpg" and not p.name.startswith(".")),
        key=natural_key,
    )
    if not frames:
        raise EvaluationDataError(
            f"'{frame_dir}' holds no .jpg frame (sequence '{name}' is empty); restore its frames"
        )
    if len(frames) < 3:
        raise EvaluationDataError(
            f"'{frame_dir}' holds {len(frames)} frame(s); DAVIS scoring skips the first and the last frame, "
            "so a sequence needs at least 3"
        )
    if not mask_dir.is_dir():
        raise EvaluationDataNotFoundError(
            f"'{mask_dir}' not found: the ground-truth masks of sequence '{name}'; every listed sequence needs "
            "Annotations/480p/<sequence>/<frame>.png"
        )
    masks = [mask_dir / f"{frame.stem}.png" for frame in frames]
    _, size = _header_hw(frames[0])
    for frame, mask in zip(frames, masks, strict=True):
        if not mask.is_file():
            raise EvaluationDataNotFoundError(
                f"'{mask}' not found: the mask of frame '{frame}'; every frame needs a mask of the same name"
            )
        _, frame_size = _header_hw(frame)
        mode, mask_size = _header_hw(mask)
        _check_mask_mode(mask, mode)
        if frame_size != size:
            raise EvaluationDataError(
                f"'{frame}' is {frame_size[1]}x{frame_size[0]} but '{frames[0]}' is {size[1]}x{size[0]}; "
                "all frames of a sequence must have one size"
            )
        if mask_size != frame_size:
            raise EvaluationDataError(
                f"'{mask}' is {mask_size[1]}x{mask_size[0]} but its frame '{frame}' is "
                f"{frame_size[1]}x{frame_size[0]}; a mask must have the size of its frame"
            )
    num_objects = count_objects(read_mask(masks[0]), masks[0])
    for mask in masks[1:]:
        read_mask(mask, num_objects)  # object ids beyond the first frame's are an error
    return DavisSequence(name, tuple(frames), tuple(masks), size, num_objects)


def scan_davis(
    root: str | Path, split: str = "val", sequences: Sequence[str] | None = None, resolution: str = "480p"
) -> list[DavisSequence]:
    """Check the DAVIS layout under ``root`` and list the sequences of ``ImageSets/2017/<split>.txt`` (or the named
    ``sequences`` among them).

    Checks, before any frame goes through a model: the list file, the frame and mask folders, one mask per frame,
    equal sizes, palette masks, and (decoding the masks once) that no mask holds an object id beyond the first
    frame's. Raises :class:`~dora_lightning.evaluation.contract.EvaluationDataNotFoundError` (a ``FileNotFoundError``) for a missing
    file or folder and :class:`~dora_lightning.evaluation.contract.EvaluationDataError` (a ``ValueError``) for a malformed one, with one
    line naming the faulty file and what to do.
    """
    root = Path(root)
    if not root.is_dir():
        raise EvaluationDataNotFoundError(f"DAVIS folder '{root}' not found; {_HOW_TO}")
    list_file = root / "ImageSets" / "2017" / f"{split}.txt"
    names = _read_sequence_list(list_file)
    if sequences is not None:
        unknown = [s for s in sequences if s not in names]
        if unknown:
            raise EvaluationDataError(
                f"sequence(s) {unknown} not listed in '{list_file}'; pick among: {', '.join(names[:10])}"
                + (" ..." if len(names) > 10 else "")
            )
        names = [n for n in names if n in set(sequences)]
        if not names:
            raise ValueError("sequences=[] selects no sequence; pass null for all of the split")
    image_root = root / "JPEGImages" / resolution
    mask_root = root / "Annotations" / resolution
    if not image_root.is_dir():
        raise EvaluationDataNotFoundError(f"'{image_root}' not found: the DAVIS frames; {_HOW_TO}")
    if not mask_root.is_dir():
        raise EvaluationDataNotFoundError(
            f"'{mask_root}' not found: the DAVIS ground-truth masks (semi-supervised Annotations); {_HOW_TO}"
        )
    return [_scan_sequence(name, image_root, mask_root, list_file) for name in names]


def model_size(height: int, width: int, short_side: int, patch_size: int) -> tuple[int, int]:
    """(H', W') at which a (height, width) frame is fed to the backbone.

    The short side becomes ``short_side`` rounded down to a multiple of the patch size; the long side keeps the
    aspect ratio and is rounded down to a multiple of the patch size (DINO rounds it to a multiple of 64). 854x480
    DAVIS frames at short side 480: 480 x 848 with patch 16 (DINO: 480 x 832), 476 x 840 with patch 14.
    """
    short = short_side // patch_size * patch_size
    if short < patch_size:
        raise ValueError(f"short_side={short_side} is smaller than the patch size {patch_size}")
    if height <= width:
        long = int(short * width / height) // patch_size * patch_size
        return short, max(long, patch_size)
    long = int(short * height / width) // patch_size * patch_size
    return max(long, patch_size), short


def patch_grid(size: tuple[int, int], short_side: int, patch_size: int) -> tuple[int, int]:
    """(gh, gw): the patch grid of an (H, W) frame fed to the backbone at ``short_side`` (:func:`model_size`)."""
    height, width = model_size(*size, short_side, patch_size)
    return height // patch_size, width // patch_size


def read_frame(path: str | Path, size: tuple[int, int]) -> Tensor:
    """A frame as a normalised (3, H', W') float tensor at ``size`` = (H', W').

    RGB (:func:`~dora_lightning.evaluation.image_data.rgb_image`: 16-bit frames scaled to 8 bits), resized
    bilinearly without antialiasing and rounded to 8 bits (as OpenCV's ``cv2.resize`` in DINO), scaled to [0, 1] and
    normalised with DINO's DAVIS mean and std (:data:`DAVIS_MEAN`, :data:`DAVIS_STD`).
    """
    try:
        with Image.open(path) as image:
            pixels = np.asarray(rgb_image(image), dtype=np.uint8)
    except Exception as err:
        raise EvaluationDataError(f"cannot read frame '{path}': {type(err).__name__}: {err}") from err
    tensor = torch.from_numpy(pixels.copy()).permute(2, 0, 1).float()
    if tuple(tensor.shape[1:]) != tuple(size):
        tensor = F.interpolate(
            tensor[None], size=size, mode="bilinear", align_corners=False, antialias=False
        )[0]
        tensor = tensor.round().clamp(0, 255)
    mean = torch.tensor(DAVIS_MEAN).view(3, 1, 1)
    std = torch.tensor(DAVIS_STD).view(3, 1, 1)
    return (tensor / 255.0 - mean) / std


def read_mask(path: str | Path, num_objects: int | None = None) -> np.ndarray:
    """A ground-truth mask as an (H, W) uint8 array of object ids (255 void).

    With ``num_objects`` (K, from the first frame), any id above K other than 255 is an error: in DAVIS
    semi-supervised every object appears in the first frame.
    """
    try:
        with Image.open(path) as image:
            _check_mask_mode(Path(path), image.mode)
            labels = np.asarray(image, dtype=np.uint8)
    except ValueError:
        raise
    except Exception as err:
        raise EvaluationDataError(f"cannot read mask '{path}': {type(err).__name__}: {err}") from err
    if num_objects is not None:
        bad = np.unique(labels[(labels > num_objects) & (labels != 255)])
        if bad.size:
            raise EvaluationDataError(
                f"'{path}' holds object id(s) {bad.tolist()[:5]} but the first frame has {num_objects} object(s) "
                f"(ids 1..{num_objects}); every object must appear in the first frame's mask"
            )
    return labels


def count_objects(first_mask: np.ndarray, path: str | Path) -> int:
    """K: the largest object id of the first frame's mask (void 255 excluded); error if it holds no object."""
    ids = first_mask[first_mask != 255]
    k = int(ids.max()) if ids.size else 0
    if k == 0:
        raise EvaluationDataError(
            f"first-frame mask '{path}' holds no object (only background/void): nothing to propagate"
        )
    return k


def grid_labels(mask: np.ndarray, grid: tuple[int, int]) -> Tensor:
    """The mask downsampled to the (gh, gw) patch grid with PIL's nearest neighbour (as DINO), void 255 -> 0."""
    clean = np.where(mask == 255, 0, mask).astype(np.uint8)
    small = Image.fromarray(clean).resize((grid[1], grid[0]), Image.NEAREST)
    return torch.from_numpy(np.asarray(small, dtype=np.uint8).copy())


class DavisFrames(IterableDataset):
    """Frames of DAVIS sequences in order, each sequence read whole by one worker of one process.

    Process ``rank`` of ``world_size`` takes sequences ``rank::world_size``; dataloader worker w of W takes every W-th
    of those. Use with ``DataLoader(batch_size=None)``. Each item is a dict:

    * ``image``: (3, H', W') normalised frame (:func:`read_frame`, size :func:`model_size`);
    * ``mask``: (H, W) uint8 ground truth at the original size;
    * ``grid_labels``: (gh, gw) uint8 ground truth on the patch grid (first frame only, else absent);
    * ``sequence``, ``frame`` (file stem), ``index``, ``num_frames``, ``num_objects`` (K of the first frame).
    """

    def __init__(
        self,
        sequences: Sequence[DavisSequence],
        short_side: int,
        patch_size: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        super().__init__()
        self.sequences = list(sequences)
        self.short_side, self.patch_size = int(short_side), int(patch_size)
        self.rank, self.world_size = int(rank), int(world_size)
        if 0 < len(self.sequences) < self.world_size:
            # a process without a sequence would skip the evaluation loop and its end, where the others wait for it
            raise EvaluatorSettingError(
                f"{len(self.sequences)} DAVIS sequence(s) cannot be shared by {self.world_size} processes (each "
                "needs at least one); run on at most that many devices (--trainer.devices) or give more sequences"
            )

    def own_sequences(self) -> list[DavisSequence]:
        """The sequences this process reads."""
        return self.sequences[self.rank :: self.world_size]

    def __len__(self) -> int:
        return sum(len(s) for s in self.own_sequences())

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        mine = self.own_sequences()
        if info is not None:
            mine = mine[info.id :: info.num_workers]
        for sequence in mine:
            yield from self._frames(sequence)

    def _frames(self, sequence: DavisSequence) -> Iterator[dict[str, Any]]:
        size = model_size(*sequence.size, self.short_side, self.patch_size)
        grid = patch_grid(sequence.size, self.short_side, self.patch_size)
        num_objects = sequence.num_objects
        first = read_mask(sequence.masks[0])
        for index, (frame, mask_path) in enumerate(zip(sequence.frames, sequence.masks, strict=True)):
            mask = first if index == 0 else read_mask(mask_path, num_objects)
            item: dict[str, Any] = {
                "image": read_frame(frame, size),
                "mask": torch.from_numpy(mask.copy()),
                "sequence": sequence.name,
                "frame": frame.stem,
                "index": index,
                "num_frames": len(sequence),
                "num_objects": num_objects,
            }
            if index == 0:
                item["grid_labels"] = grid_labels(mask, grid)
            yield item
