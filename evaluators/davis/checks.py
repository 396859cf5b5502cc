"""The DAVIS evaluator's options checked against the data and the run before any frame goes through the backbone and
before any file is written: ``topk`` against the smallest frame's patch grid, ``output_dir`` against the data set's
folders, and the Trainer's batch limit against the sequences. Each raises
:class:`~dora_lightning.evaluation.contract.EvaluatorSettingError` with one line naming the option and the fix."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import lightning.pytorch as pl

from dora_lightning.evaluation.contract import EvaluatorSettingError
from dora_lightning.evaluation.loader_limits import refuse_cut_loader
from evaluators.davis.data import DavisFrames, DavisSequence, patch_grid

__all__ = ["check_output_dir", "check_topk", "data_folders", "refuse_cut_sequences"]


def check_topk(topk: int, sequences: Sequence[DavisSequence], short_side: int, patch_size: int) -> None:
    """Refuse a ``topk`` above the patches of the smallest frame grid: the first propagated frame of that sequence has
    only the first frame as context, so at most that many sources to keep."""
    grids = {s.name: patch_grid(s.size, short_side, patch_size) for s in sequences}
    name = min(grids, key=lambda n: grids[n][0] * grids[n][1])
    rows, cols = grids[name]
    patches = rows * cols
    if topk > patches:
        allowed = "1" if patches == 1 else f"between 1 and {patches}"
        raise EvaluatorSettingError(
            f"topk={topk} exceeds the {patches} patch(es) of the smallest frame grid ({rows}x{cols} patches of "
            f"{patch_size} px, sequence '{name}' at --evaluator.short_side {short_side}); pass --evaluator.topk "
            f"{allowed}, or a larger --evaluator.short_side"
        )


def data_folders(root: str | Path, sequences: Sequence[DavisSequence]) -> set[Path]:
    """The folders (symlinks resolved) that hold the data set's files: ``JPEGImages``, ``Annotations`` and
    ``ImageSets`` of ``root``, every sequence's frame and mask folder, and the folders their files resolve into."""
    base = Path(root)
    folders = {(base / name).resolve() for name in ("JPEGImages", "Annotations", "ImageSets")}
    for sequence in sequences:
        for files in (sequence.frames, sequence.masks):
            folders.add(files[0].parent.resolve())
            folders.update(path.resolve().parent for path in files)
    return folders


def check_output_dir(output_dir: str | Path, root: str | Path, sequences: Sequence[DavisSequence]) -> None:
    """Refuse an ``output_dir`` that is the data set's root or where a prediction could land among its files: in its
    ``JPEGImages``, ``Annotations`` or ``ImageSets`` folders, or in any folder holding its frames or masks (symlinks
    resolved, the predictions' ``output_dir/<sequence>`` folders too). A predicted mask written over the ground truth
    would make the next run score the predictions against themselves."""
    out, root_dir = Path(output_dir), Path(root).resolve()
    folders = data_folders(root, sequences)
    for target in (out, *(out / s.name for s in sequences)):
        resolved = target.resolve()
        hits = [f for f in folders if resolved == f or f in resolved.parents]
        if root_dir == resolved:
            hits.append(root_dir)
        if hits:
            hit = min(hits, key=lambda f: (len(f.parts), str(f)))  # the outermost, for a stable message
            raise EvaluatorSettingError(
                f"--evaluator.output_dir '{output_dir}' would put the predictions among the files of the DAVIS data "
                f"set (in '{hit}'), overwriting or mixing with them; give a folder outside its "
                f"JPEGImages, Annotations and ImageSets folders and other than '{root}'"
            )


def refuse_cut_sequences(
    trainer: pl.Trainer, sequences: Sequence[DavisSequence], short_side: int, patch_size: int
) -> None:
    """Refuse a Trainer batch limit (``limit_val_batches``, ``fast_dev_run``, ...) that would stop a process before
    the last frame of its sequences (one batch per frame; the process with the most frames decides)."""
    world_size = trainer.world_size
    frames = max(
        len(DavisFrames(sequences, short_side, patch_size, rank=rank, world_size=world_size))
        for rank in range(world_size)
    )
    refuse_cut_loader(
        trainer,
        "val",
        frames,
        f"the {sum(len(s) for s in sequences)} frames of {len(sequences)} sequence(s) (one batch per frame)",
        remedy="evaluate fewer sequences (--evaluator.sequences)",
    )
