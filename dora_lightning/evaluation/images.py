"""Reading image headers for the evaluation data checks (segmentation masks, DAVIS frames): one reader, one order."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from PIL import Image

from dora_lightning.evaluation.contract import EvaluationDataError


def image_header(path: str | Path) -> tuple[str, tuple[int, int]]:
    """(PIL mode, (width, height)) of an image file, reading only its header; an unreadable file is an
    :class:`EvaluationDataError` naming it."""
    try:
        with Image.open(path) as image:
            return image.mode, image.size
    except Exception as err:  # PIL raises several kinds (UnidentifiedImageError, OSError, SyntaxError, ...)
        raise EvaluationDataError(f"cannot read image '{path}': {type(err).__name__}: {err}") from err


def natural_key(path: Path) -> tuple[list[Any], str]:
    """Sort key of a numbered file (a frame): its name with the numbers in it compared as numbers (``2.jpg`` before
    ``10.jpg``; zero-padded names keep their text order), then the name itself (``01`` and ``1`` in a fixed order)."""
    parts = [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", path.name)]
    return parts, path.name
