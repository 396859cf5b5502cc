"""Linear probe on frozen features (DINO ``eval_linear.py``, spec D); see docs/evaluation.md.

The backbone is frozen and kept in eval mode; the feature of an image is the concatenation of the final-normed CLS
tokens of the last ``n_last_blocks`` blocks (optionally followed by the average of the last block's final-normed patch
tokens). One ``nn.Linear`` per learning rate (weights N(0, 0.01), bias 0) is trained on the same features with SGD
(momentum 0.9), the lr scaled as ``base_lr * global_batch / 256`` and annealed to 0 by a per-step cosine. Top-1 and
top-5 accuracy on the validation split are measured after every epoch; both the best epoch's top-1 (DINO's headline)
and the final epoch's are reported, in percent. Under DDP each process scores its own share of the validation images,
none repeated (:func:`dora_lightning.evaluation.samplers.unrepeated_sampler`), so every image counts exactly once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import lightning.pytorch as pl
from timm.models.vision_transformer import VisionTransformer

from dora_lightning.evaluation.contract import EvaluationDataError, Evaluator
from dora_lightning.evaluation.image_data import ImageFolderDataModule
from dora_lightning.evaluation.loader_limits import refuse_cut_splits
from dora_lightning.evaluation.probe import (
    check_n_last_blocks,
    frozen_backbone,
    probe_trainer_kwargs,
    refuse_spawned_strategy,
)
from evaluators.linear.module import LinearProbeModule, lr_key, probe_features

__all__ = ["LinearProbeEvaluator", "LinearProbeModule", "lr_key", "probe_features", "summarize"]

PREFIX = "linear"


def summarize(history: Sequence[dict[str, Any]], lrs: Sequence[float], per_lr: bool) -> dict[str, float]:
    """Metrics from the per-epoch validation history of :class:`LinearProbeModule`.

    ``history[j]`` is ``{"epoch": e (1-based), "top1": [per head], "top5": [per head], "images": n}`` (accuracies in
    percent, as DINO and the k-NN evaluator print them; ``images`` is not used here). Returns:

    * ``linear/top1_best``: the highest top-1 over all epochs (and all lrs of a grid) — DINO's headline number;
      ``linear/top1_best_epoch`` (1-based, the first epoch reaching it), ``linear/top1_best_lr`` (base lr) and
      ``linear/top5_at_top1_best`` (top-5 of that head at that epoch);
    * ``linear/top1_final``, ``linear/top5_final``: the last validated epoch's accuracy of the head whose final top-1
      is highest, and ``linear/top1_final_lr`` (its base lr);
    * ``linear/epochs_validated``: how many validations the history holds;
    * with ``per_lr`` (an lr grid): the same per head as ``linear/lr_<lr>/top1_best``, ``.../top1_best_epoch``,
      ``.../top5_at_top1_best``, ``.../top1_final``, ``.../top5_final``.

    Ties go to the earlier epoch and to the earlier lr of the grid.
    """
    if not history:
        raise ValueError(
            "no validation results: the probe was never validated (check limit_val_batches / epochs)"
        )
    heads: list[dict[str, float]] = []
    for i, lr in enumerate(lrs):
        top1 = [float(h["top1"][i]) for h in history]
        best = max(range(len(history)), key=lambda j: (top1[j], -j))
        heads.append(
            {
                "lr": float(lr),
                "top1_best": top1[best],
                "top1_best_epoch": float(history[best]["epoch"]),
                "top5_at_top1_best": float(history[best]["top5"][i]),
                "top1_final": top1[-1],
                "top5_final": float(history[-1]["top5"][i]),
            }
        )
    best_head = max(range(len(heads)), key=lambda i: (heads[i]["top1_best"], -i))
    final_head = max(range(len(heads)), key=lambda i: (heads[i]["top1_final"], -i))
    b, f = heads[best_head], heads[final_head]
    metrics = {
        f"{PREFIX}/top1_best": b["top1_best"],
        f"{PREFIX}/top1_best_epoch": b["top1_best_epoch"],
        f"{PREFIX}/top1_best_lr": b["lr"],
        f"{PREFIX}/top5_at_top1_best": b["top5_at_top1_best"],
        f"{PREFIX}/top1_final": f["top1_final"],
        f"{PREFIX}/top5_final": f["top5_final"],
        f"{PREFIX}/top1_final_lr": f["lr"],
        f"{PREFIX}/epochs_validated": float(len(history)),
    }
    if per_lr:
        for head in heads:
            key = f"{PREFIX}/{lr_key(head['lr'])}"
            for name in ("top1_best", "top1_best_epoch", "top5_at_top1_best", "top1_final", "top5_final"):
                metrics[f"{key}/{name}"] = head[name]
    return metrics


class LinearProbeEvaluator(Evaluator):
    """Linear probe of a frozen backbone on an ImageFolder data set (spec D; DINO eval_linear).

    Args:
        data_dir, image_size, batch_size, num_workers, which, output_dir: see :class:`dora_lightning.evaluation.contract.Evaluator`.
        n_last_blocks: CLS tokens of this many last blocks are concatenated (4 for ViT-S in DINO/DoRA).
        avgpool_patchtokens: also append the average of the last block's patch tokens.
        epochs: training epochs (validation after each); sets the Trainer's ``max_epochs``.
        lr: base learning rate per 256 images; the SGD lr is ``lr * batch_size * devices * accumulation / 256``.
        lrs: an optional grid of base lrs, trained in one pass (one head each, same features); replaces ``lr``.
        momentum, weight_decay: of SGD.
        train_augment: RandomResizedCrop + flip for training images (else the eval transform).
        seed: seeds data order, augmentation and head initialisation (``lightning.seed_everything``).
    """

    name: ClassVar[str] = "linear"

    def __init__(
        self,
        data_dir: str = "assets/fashion_mnist",
        image_size: int = 224,
        batch_size: int = 256,
        num_workers: int = 2,
        which: Literal["teacher", "student"] = "teacher",
        output_dir: str | None = None,
        n_last_blocks: int = 4,
        avgpool_patchtokens: bool = False,
        epochs: int = 100,
        lr: float = 0.001,
        lrs: list[float] | None = None,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        train_augment: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__(
            data_dir=data_dir,
            image_size=image_size,
            batch_size=batch_size,
            num_workers=num_workers,
            which=which,
            output_dir=output_dir,
        )
        if n_last_blocks < 1:
            raise ValueError(f"n_last_blocks must be >= 1, got {n_last_blocks}")
        if epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {epochs}")
        grid = [float(x) for x in lrs] if lrs is not None else None
        if grid is not None:
            if not grid:
                raise ValueError("lrs is an empty list; give at least one lr or leave lrs unset to use lr")
            if len({lr_key(x) for x in grid}) != len(grid):
                raise ValueError(f"lrs holds the same lr twice: {grid}")
        for value in grid or [lr]:
            if not value >= 0:
                raise ValueError(f"learning rates must be >= 0, got {value}")
        self.n_last_blocks = int(n_last_blocks)
        self.avgpool_patchtokens = bool(avgpool_patchtokens)
        self.epochs = int(epochs)
        self.lr = float(lr)
        self.lrs = grid
        self.momentum = float(momentum)
        self.weight_decay = float(weight_decay)
        self.train_augment = bool(train_augment)
        self.seed = int(seed)
        self.history: list[dict[str, Any]] = []
        self.effective_lrs: list[float] = []
        self.data_facts: dict[str, Any] = {}

    @property
    def base_lrs(self) -> list[float]:
        return list(self.lrs) if self.lrs is not None else [self.lr]

    def datamodule(self) -> ImageFolderDataModule:
        return ImageFolderDataModule(
            self.data_dir,
            image_size=self.image_size,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            train_augment=self.train_augment,
        )

    def trainer_kwargs(self, trainer_kwargs: dict[str, Any]) -> dict[str, Any]:
        """The Trainer arguments used: the given ones, ``max_epochs = epochs``, and evaluation defaults for options
        that are absent or None (no sanity check, validation every epoch, no checkpoints, ``output_dir`` as root)."""
        return probe_trainer_kwargs(
            trainer_kwargs, self.epochs, self.output_dir, "the linear probe", {"check_val_every_n_epoch": 1}
        )

    def evaluate(self, backbone: VisionTransformer, trainer_kwargs: dict[str, Any]) -> dict[str, float]:
        """Train the probe(s) for ``epochs`` epochs with ``Trainer(**trainer_kwargs)`` and return the metrics.

        See :func:`summarize` for the metric names. The backbone's ``requires_grad`` flags and train/eval mode are
        restored afterwards. Raises ``ValueError`` for a bad data layout (a single class included), ``n_last_blocks`` >
        the backbone's depth, or a Trainer batch limit that would cut the training or validation images.
        """
        check_n_last_blocks(backbone, self.n_last_blocks)
        pl.seed_everything(self.seed, workers=True, verbose=False)
        data = self.datamodule()
        data.setup("fit")
        assert data.train_dataset is not None and data.val_dataset is not None
        if data.num_classes < 2:
            raise EvaluationDataError(
                f"a linear probe needs at least 2 classes; '{data.root / 'train'}' and '{data.root / 'val'}' hold "
                f"one class folder ('{data.class_names[0]}'): add the other classes' folders to both splits"
            )
        self.data_facts = {
            "num_classes": data.num_classes,
            "train_images": len(data.train_dataset),
            "val_images": len(data.val_dataset),
        }
        with frozen_backbone(backbone):  # entered before the probe module freezes it
            module = LinearProbeModule(
                backbone,
                data.num_classes,
                lrs=self.base_lrs,
                batch_size=self.batch_size,
                n_last_blocks=self.n_last_blocks,
                avgpool_patchtokens=self.avgpool_patchtokens,
                momentum=self.momentum,
                weight_decay=self.weight_decay,
                seed=self.seed,
            )
            trainer = pl.Trainer(**self.trainer_kwargs(trainer_kwargs))
            refuse_spawned_strategy(trainer, "the linear probe")
            refuse_cut_splits(
                trainer, self.batch_size, self.data_facts["train_images"], self.data_facts["val_images"]
            )
            # each process validates its own share of the images, none repeated (Lightning's default DistributedSampler
            # pads the shards with repeats, which the accuracies would count twice)
            val_loader = data.val_dataloader(trainer.global_rank, trainer.world_size)
            trainer.fit(module, train_dataloaders=data.train_dataloader(), val_dataloaders=val_loader)
        self.module = module
        self.history = list(module.history)
        self.effective_lrs = list(module.effective_lrs)
        return summarize(self.history, self.base_lrs, per_lr=self.lrs is not None)

    def protocol(self) -> dict[str, Any]:
        mine: dict[str, Any] = {
            "feature": (
                f"concat of the final-normed CLS tokens of the last {self.n_last_blocks} blocks"
                + (
                    " + mean of the last block's final-normed patch tokens"
                    if self.avgpool_patchtokens
                    else ""
                )
            ),
            "n_last_blocks": self.n_last_blocks,
            "avgpool_patchtokens": self.avgpool_patchtokens,
            "head": "nn.Linear per lr, weight N(0, 0.01), bias 0; backbone frozen in eval mode",
            "epochs": self.epochs,
            "base_lrs": self.base_lrs,
            "lr_scaling": "base_lr * batch_size * devices * accumulate_grad_batches / 256",
            "optimizer": f"SGD(momentum={self.momentum}, weight_decay={self.weight_decay})",
            "schedule": "cosine to 0 over all steps (per step)",
            "train_transform": (
                f"RandomResizedCrop({self.image_size}) + horizontal flip"
                if self.train_augment
                else f"Resize(int({self.image_size} * 256/224), bicubic) + CenterCrop({self.image_size})"
            ),
            "eval_transform": f"Resize(int({self.image_size} * 256/224), bicubic) + CenterCrop({self.image_size})",
            "metrics": "top-1 / top-5 on val after every epoch; headline linear/top1_best (best epoch, as DINO)",
            "metric_unit": "percent",
            "seed": self.seed,
        }
        if self.effective_lrs:  # facts learnt while evaluating
            mine["effective_lrs"] = self.effective_lrs
            mine.update(self.data_facts)
            # per validated epoch: top-1 / top-5 per head (base_lrs order) and the number of images scored
            mine["val_history"] = self.history
        return {**super().protocol(), **mine}
