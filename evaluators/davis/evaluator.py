"""DAVIS-2017 semi-supervised video object segmentation by label propagation (DINO ``eval_video_segmentation.py``,
spec D, G.7); see docs/evaluation.md.

Every frame goes through the frozen backbone once, at short side ``short_side`` (480) with the long side rounded down to
a multiple of the patch size; its last-block patch tokens after the final norm, L2-normalised, are its features. The
first frame's ground truth is propagated frame by frame (:mod:`evaluators.davis.propagation`: first frame + 7 latest
predictions as context, neighbourhood radius 12 patches, top-5 affinities exp(cos / 0.1)); predictions are written as
palette PNGs in the layout davis2017-evaluation reads (``output_dir/<sequence>/<frame>.png``, first frame = ground
truth) and scored on the fly (:mod:`evaluators.davis.metrics`: J, F on all frames but the first and the last).

Run as ``trainer.validate`` over a dataloader of frames (:class:`evaluators.davis.data.DavisFrames`) in which each
sequence is read in order by one worker of one process; under DDP the processes split the sequences and the per-frame
scores are gathered at the end. Memory holds the context queue of the sequences in flight, never a whole sequence.
"""

from __future__ import annotations

import csv
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
import torch
from PIL import Image
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor
from torch.utils.data import DataLoader

from dora_lightning.evaluation.contract import EvaluationDataError, Evaluator
from dora_lightning.models.backbone import forward_features, patch_size_of
from evaluators.davis.checks import check_output_dir, check_topk, refuse_cut_sequences
from evaluators.davis.data import (
    DAVIS_MEAN,
    DAVIS_STD,
    DavisFrames,
    DavisSequence,
    model_size,
    scan_davis,
    write_palette_png,
)
from evaluators.davis.metrics import BOUND_TH, GLOBAL_COLUMNS, ObjectScores, frame_scores, summarize
from evaluators.davis.propagation import LabelPropagator, labels_from_soft

__all__ = ["DavisEvaluator", "DavisPropagationModule", "metric_name", "write_csvs"]


def metric_name(column: str) -> str:
    """The metric key of a davis2017-evaluation column: ``J&F-Mean`` -> ``davis/J&F-mean``."""
    measure, stat = column.split("-")
    return f"davis/{measure}-{stat.lower()}"


@dataclass
class _Running:
    """A sequence being propagated: its propagator, object count, output folder and per-frame scores so far."""

    propagator: LabelPropagator
    num_objects: int
    folder: Path
    next_index: int = 1
    j: list[np.ndarray] = field(default_factory=list)
    f: list[np.ndarray] = field(default_factory=list)


def _check_args(n_last_frames: int, radius: int, topk: int, temperature: float, short_side: int) -> None:
    if n_last_frames < 0:
        raise ValueError(f"n_last_frames must be >= 0, got {n_last_frames}")
    if radius < 0:
        raise ValueError(f"size_mask_neighborhood must be >= 0 (0: no restriction), got {radius}")
    if topk < 1:
        raise ValueError(f"topk must be >= 1, got {topk}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if short_side < 1:
        raise ValueError(f"short_side must be >= 1, got {short_side}")


class DavisPropagationModule(pl.LightningModule):
    """Label propagation over DAVIS sequences with a frozen backbone, run by ``trainer.validate(module)``.

    Builds its own dataloader (:meth:`val_dataloader`, sequences split over processes). After the run,
    :attr:`metrics` holds ``davis/J&F-mean`` etc. in percent, :attr:`per_sequence` the per-frame scores
    ``{sequence: (J (K, T-2), F (K, T-2))}`` and :attr:`objects` the per-object statistics (fractions).

    Args:
        backbone: a timm ViT; frozen and kept in eval mode.
        sequences: the scanned sequences (:func:`evaluators.davis.data.scan_davis`).
        output_dir: predictions go to ``output_dir/<sequence>/<frame>.png``.
        short_side, n_last_frames, size_mask_neighborhood, topk, temperature, bound_th, num_workers: see
            :class:`DavisEvaluator`.
        chunk_size: target patches whose affinities are computed at once (memory: contexts x patches x chunk_size
            floats; at 480p with patch 16 a frame has 1,590 patches, one chunk).
    """

    def __init__(
        self,
        backbone: VisionTransformer,
        sequences: list[DavisSequence],
        output_dir: str | Path,
        short_side: int = 480,
        n_last_frames: int = 7,
        size_mask_neighborhood: int = 12,
        topk: int = 5,
        temperature: float = 0.1,
        bound_th: float = BOUND_TH,
        num_workers: int = 2,
        chunk_size: int = 4096,
    ) -> None:
        super().__init__()
        _check_args(n_last_frames, size_mask_neighborhood, topk, temperature, short_side)
        self.backbone = backbone.requires_grad_(False).eval()
        self.patch_size = patch_size_of(backbone)
        self.sequences = list(sequences)
        self.output_dir = Path(output_dir)
        self.short_side, self.n_last_frames = int(short_side), int(n_last_frames)
        self.radius, self.topk, self.temperature = int(size_mask_neighborhood), int(topk), float(temperature)
        self.bound_th, self.num_workers, self.chunk_size = float(bound_th), int(num_workers), int(chunk_size)
        self.metrics: dict[str, float] = {}
        self.per_sequence: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.objects: list[ObjectScores] = []
        self.global_scores: dict[str, float] = {}
        self._running: dict[str, _Running] = {}

    def train(self, mode: bool = True) -> DavisPropagationModule:
        super().train(mode)
        self.backbone.eval()  # frozen features, whatever Lightning asks
        return self

    def val_dataloader(self) -> DataLoader:
        frames = DavisFrames(
            self.sequences,
            self.short_side,
            self.patch_size,
            rank=self.global_rank,
            world_size=self.trainer.world_size if self._trainer is not None else 1,
        )
        return DataLoader(frames, batch_size=None, num_workers=self.num_workers)

    @torch.no_grad()
    def frame_features(self, batch: dict[str, Any]) -> Tensor:
        """(N, d) final-normed patch tokens of the batch's (3, H, W) frame (L2-normalised by the propagator)."""
        _cls, patches = forward_features(self.backbone, batch["image"].unsqueeze(0))
        return patches[0]

    def on_validation_epoch_start(self) -> None:
        self._running = {}
        self.per_sequence, self.objects, self.metrics = {}, [], {}

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        name, index = str(batch["sequence"]), int(batch["index"])
        features = self.frame_features(batch)
        truth = batch["mask"].cpu().numpy()
        if index == 0:
            self._start(name, batch, features, truth)
            return
        state = self._running.get(name)
        if state is None or index != state.next_index:
            expected = "frame 0" if state is None else f"frame {state.next_index}"
            raise RuntimeError(
                f"sequence '{name}': got frame {index}, expected {expected}; frames must come in order"
            )
        soft = state.propagator.step(features)
        grid = state.propagator.grid
        small = labels_from_soft(soft, grid, self.patch_size).to(torch.uint8).cpu().numpy()
        height, width = truth.shape
        predicted = np.asarray(Image.fromarray(small).resize((width, height), Image.NEAREST))
        write_palette_png(predicted, state.folder / f"{batch['frame']}.png")
        last = int(batch["num_frames"]) - 1
        if index < last:  # the first and the last frame are not scored
            j, f = frame_scores(truth, predicted, state.num_objects, self.bound_th)
            state.j.append(j)
            state.f.append(f)
        state.next_index += 1
        if index == last:
            self.per_sequence[name] = (np.stack(state.j, axis=1), np.stack(state.f, axis=1))
            del self._running[name]

    def _start(self, name: str, batch: dict[str, Any], features: Tensor, truth: np.ndarray) -> None:
        grid_labels = batch["grid_labels"]
        grid = (int(grid_labels.shape[0]), int(grid_labels.shape[1]))
        if features.shape[0] != grid[0] * grid[1]:
            raise RuntimeError(
                f"sequence '{name}': the backbone gave {features.shape[0]} patches for a {grid[0]}x{grid[1]} grid"
            )
        folder = self.output_dir / name
        folder.mkdir(parents=True, exist_ok=True)
        write_palette_png(np.where(truth == 255, 0, truth), folder / f"{batch['frame']}.png")
        num_objects = int(batch["num_objects"])
        propagator = LabelPropagator(
            features,
            grid_labels.to(features.device),
            num_objects + 1,
            n_last_frames=self.n_last_frames,
            topk=self.topk,
            temperature=self.temperature,
            radius=self.radius,
            chunk_size=self.chunk_size,
        )
        self._running[name] = _Running(propagator, num_objects, folder)

    def on_validation_epoch_end(self) -> None:
        if self._running:
            raise RuntimeError(
                f"sequence(s) {sorted(self._running)} ended before their last frame; "
                "do not limit the validation batches (trainer.limit_val_batches) for DAVIS"
            )
        results = dict(self.per_sequence)
        if (
            self.trainer.world_size > 1
            and torch.distributed.is_available()
            and torch.distributed.is_initialized()
        ):
            gathered: list[Any] = [None] * self.trainer.world_size
            torch.distributed.all_gather_object(gathered, results)
            results = {k: v for part in gathered for k, v in part.items()}
        self.per_sequence = results
        self.global_scores, self.objects = summarize(results)
        self.metrics = {metric_name(k): 100.0 * v for k, v in self.global_scores.items()}
        self._running = {}


def write_csvs(
    output_dir: str | Path, global_scores: dict[str, float], objects: list[ObjectScores], split: str
) -> tuple[Path, Path]:
    """Write ``global_results-<split>.csv`` and ``per-sequence_results-<split>.csv`` as davis2017-evaluation does
    (fractions, 5 decimals; one per-sequence row per object ``<sequence>_<id>``). Returns both paths."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    global_path = out / f"global_results-{split}.csv"
    with global_path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(GLOBAL_COLUMNS)
        writer.writerow([f"{global_scores[c]:.5f}" for c in GLOBAL_COLUMNS])
    sequence_path = out / f"per-sequence_results-{split}.csv"
    with sequence_path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["Sequence", "J-Mean", "F-Mean"])
        for obj in objects:
            writer.writerow([obj.name, f"{obj.j_mean:.5f}", f"{obj.f_mean:.5f}"])
    return global_path, sequence_path


class DavisEvaluator(Evaluator):
    """DAVIS-2017 semi-supervised video object segmentation by label propagation (DINO protocol; spec D, G.7).

    Reports, in percent, ``davis/J&F-mean``, ``davis/J-mean``, ``davis/J-recall``, ``davis/J-decay``, ``davis/F-mean``,
    ``davis/F-recall`` and ``davis/F-decay`` as davis2017-evaluation computes them (``--task semi-supervised``);
    writes the predicted PNGs, ``global_results-<split>.csv`` and ``per-sequence_results-<split>.csv`` to
    ``output_dir``. The backbone keeps its checkpoint's position embedding, resampled to each frame's patch grid.

    Args:
        data_dir: the DAVIS-2017 root (``JPEGImages/480p``, ``Annotations/480p``, ``ImageSets/2017``); see
            docs/evaluation.md, or ``python -m dora_lightning.evaluation.synthetic davis --out DIR`` for a small synthetic one.
        split: the sequence list ``ImageSets/2017/<split>.txt`` (davis2017-evaluation's ``--set``).
        sequences: evaluate only these sequences of the split (null: all).
        short_side: frames are resized to this short side (480 as DINO); both sides are rounded down to a multiple
            of the patch size (DINO rounds the long side to a multiple of 64).
        n_last_frames: predicted frames kept as context besides the first frame.
        size_mask_neighborhood: radius, in patches, of the square window of sources per target (0: no window).
        topk: affinities kept per target patch, over all context frames; at most the patches of the smallest
            frame's grid at ``short_side`` (checked before the run).
        temperature: affinity exp(cosine / temperature).
        bound_th: boundary tolerance of F, a fraction of the image diagonal (or pixels if >= 1).
        num_workers, which, output_dir: see :class:`dora_lightning.evaluation.contract.Evaluator`; ``output_dir`` also receives the
            predicted PNGs and the CSV files, and must lie outside the data set's folders
            (:func:`evaluators.davis.checks.check_output_dir`).
    """

    name = "davis"

    def __init__(
        self,
        data_dir: str = "data/DAVIS",
        split: Literal["val", "train"] = "val",
        sequences: list[str] | None = None,
        short_side: int = 480,
        n_last_frames: int = 7,
        size_mask_neighborhood: int = 12,
        topk: int = 5,
        temperature: float = 0.1,
        bound_th: float = BOUND_TH,
        num_workers: int = 2,
        which: Literal["teacher", "student"] = "teacher",
        output_dir: str | None = None,
    ) -> None:
        super().__init__(
            data_dir=data_dir,
            image_size=short_side,
            batch_size=1,
            num_workers=num_workers,
            which=which,
            output_dir=output_dir,
        )
        _check_args(n_last_frames, size_mask_neighborhood, topk, temperature, short_side)
        if split not in ("val", "train"):
            raise ValueError(f"split must be 'val' or 'train', got {split!r}")
        if not bound_th > 0:
            raise ValueError(f"bound_th must be > 0, got {bound_th}")
        if sequences is not None and not sequences:
            raise ValueError("sequences=[] selects no sequence; leave it unset (null) for the whole split")
        # None: the CLI loads the backbone at its checkpoint's size (no resampling at load); each frame's grid then
        # resamples the position embedding once (timm dynamic image size).
        self.image_size = None  # type: ignore[assignment]
        self.split = split
        self.sequences = list(sequences) if sequences is not None else None
        self.short_side = int(short_side)
        self.n_last_frames = int(n_last_frames)
        self.size_mask_neighborhood = int(size_mask_neighborhood)
        self.topk = int(topk)
        self.temperature = float(temperature)
        self.bound_th = float(bound_th)
        self._facts: dict[str, Any] = {}

    def evaluate(self, backbone: VisionTransformer, trainer_kwargs: dict[str, Any]) -> dict[str, float]:
        patch_size = patch_size_of(backbone)
        if self.short_side < patch_size:
            raise EvaluationDataError(  # a setting that does not fit this backbone: reported as one CLI line
                f"short_side={self.short_side} is smaller than the backbone's patch size {patch_size}; "
                f"pass --evaluator.short_side {patch_size * 4} or more"
            )
        sequences = scan_davis(self.data_dir, self.split, self.sequences)
        check_topk(self.topk, sequences, self.short_side, patch_size)
        output_dir = self.resolved_output_dir(trainer_kwargs)
        check_output_dir(output_dir, self.data_dir, sequences)
        module = DavisPropagationModule(
            backbone,
            sequences,
            output_dir,
            short_side=self.short_side,
            n_last_frames=self.n_last_frames,
            size_mask_neighborhood=self.size_mask_neighborhood,
            topk=self.topk,
            temperature=self.temperature,
            bound_th=self.bound_th,
            num_workers=self.num_workers,
        )
        trainer = pl.Trainer(**trainer_kwargs)
        refuse_cut_sequences(trainer, sequences, self.short_side, patch_size)
        with warnings.catch_warnings():
            # DavisFrames.__len__ is exact: each worker reads its own whole sequences
            warnings.filterwarnings("ignore", message="Your `IterableDataset` has `__len__` defined")
            trainer.validate(module, verbose=False)
        patch = module.patch_size
        self._facts = {
            "num_sequences": len(sequences),
            "num_objects": len(module.objects),
            "num_frames": sum(len(s) for s in sequences),
            "num_frames_scored": sum(len(s) - 2 for s in sequences),
            "patch_size": patch,
            "model_frame_sizes": sorted(
                {"x".join(map(str, model_size(*s.size, self.short_side, patch))) for s in sequences}
            ),
            "per_object": {
                o.name: {"J-Mean": 100.0 * o.j_mean, "F-Mean": 100.0 * o.f_mean} for o in module.objects
            },
        }
        if trainer.is_global_zero:
            write_csvs(output_dir, module.global_scores, module.objects, self.split)
        return dict(module.metrics)

    def protocol(self) -> dict[str, Any]:
        settings = super().protocol()
        settings.pop("image_size", None)
        settings.pop("batch_size", None)
        return {
            **settings,
            "feature": f"{self.which} last-block patch tokens after the final norm, L2-normalised",
            "frame_transform": f"short side {self.short_side}, both sides floored to a multiple of the patch size; "
            f"bilinear; mean {list(DAVIS_MEAN)}, std {list(DAVIS_STD)} (DINO's DAVIS values: 0.228, not 0.229)",
            "context": f"first frame (ground truth) + {self.n_last_frames} latest predictions",
            "scoring": "davis2017-evaluation semi-supervised: J and F per object on all frames but the first and "
            "the last; J&F-Mean = (mean J-Mean + mean F-Mean) / 2 over all objects",
            "metric_unit": "percent (CSV files: fractions, as davis2017-evaluation)",
            **self._facts,
        }
