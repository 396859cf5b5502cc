"""Reading image headers for the evaluation data checks (segmentation masks, DAVIS frames): one reader, one order."""

from __future__ import annotations

from pathlib import Path

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
