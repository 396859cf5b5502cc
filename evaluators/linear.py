"""Linear probe on frozen features (DINO ``eval_linear.py``, spec D); see docs/evaluation.md.

The backbone is frozen and kept in eval mode; the feature of an image is the concatenation of the final-normed CLS
tokens of the last ``n_last_blocks`` blocks (optionally followed by the average of the last block's final-normed patch
tokens). One ``nn.Linear`` per learning rate (weights N(0, 0.01), bias 0) is trained on the same features with SGD
(momentum 0.9), the lr scaled as ``base_lr * global_batch / 256`` and annealed to 0 by a per-step cosine. Top-1 and
top-5 accuracy on the validation split are measured after every epoch; both the best epoch's top-1 (DINO's headline)
and the final epoch's are reported, in percent.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from dora_lightning.models.backbone import last_n_block_cls
from evaluators.base import Evaluator
from evaluators.image_data import ImageFolderDataModule

__all__ = ["LinearProbeEvaluator", "LinearProbeModule", "lr_key", "probe_features", "summarize"]

PREFIX = "linear"


def lr_key(lr: float) -> str:
    """How a base lr appears in metric names: ``linear/lr_<lr>/...`` with ``<lr>`` = ``format(lr, 'g')``."""
    return f"lr_{lr:g}"


def probe_features(backbone: VisionTransformer, images: Tensor, n_last_blocks: int, avgpool: bool) -> Tensor:
    """The linear-probe feature (B, (n_last_blocks + avgpool) * d) of DINO's eval_linear.

    Concat of the final-normed CLS tokens of the last ``n_last_blocks`` blocks (earliest first); with ``avgpool``,
    followed by the mean of the last block's final-normed patch tokens (prefix/register tokens excluded). DINO
    interleaves CLS and average element-wise (and only supports n_last_blocks=1 with it); a linear layer is
    indifferent to that order.
    """
    if not avgpool:
        return last_n_block_cls(backbone, images, n_last_blocks)
    depth = len(backbone.blocks)
    if not 1 <= n_last_blocks <= depth:
        raise ValueError(f"n must be in [1, {depth}] (the model's depth), got {n_last_blocks}")
    outs = backbone.forward_intermediates(
        images,
        indices=n_last_blocks,
        norm=True,
        return_prefix_tokens=True,
        output_fmt="NLC",
        intermediates_only=True,
    )
    cls = [prefix[:, 0] for _patches, prefix in outs]
    return torch.cat([*cls, outs[-1][0].mean(dim=1)], dim=-1)


def summarize(history: Sequence[dict[str, Any]], lrs: Sequence[float], per_lr: bool) -> dict[str, float]:
    """Metrics from the per-epoch validation history of :class:`LinearProbeModule`.

    ``history[j]`` is ``{"epoch": e (1-based), "top1": [per head], "top5": [per head]}`` (accuracies in percent,
    as DINO and the k-NN evaluator print them). Returns:

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


class LinearProbeModule(pl.LightningModule):
    """Frozen backbone + one linear head per base lr, trained together on the same features.

    Args:
        backbone: a timm ViT; its parameters are frozen (``requires_grad_(False)``) and it stays in eval mode even
            when Lightning puts the module in train mode.
        num_classes: classes of the data set.
        lrs: base learning rates (per 256 images), one head each.
        batch_size: images per batch per process (for the lr scaling).
        n_last_blocks, avgpool_patchtokens: the feature, see :func:`probe_features`.
        momentum, weight_decay: of SGD.
        seed: seeds the heads' initialisation (a private generator, so the grid's size does not change the global
            random stream).

    After every validation epoch (not the sanity check) ``history`` gets ``{"epoch", "top1", "top5"}`` with one
    accuracy per head, in percent; top-5 is top-min(5, num_classes).
    """

    def __init__(
        self,
        backbone: VisionTransformer,
        num_classes: int,
        lrs: Sequence[float] = (0.001,),
        batch_size: int = 256,
        n_last_blocks: int = 4,
        avgpool_patchtokens: bool = False,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not lrs:
            raise ValueError("lrs must hold at least one learning rate")
        if num_classes < 2:
            raise ValueError(f"a linear probe needs at least 2 classes, got {num_classes}")
        self.save_hyperparameters(ignore=["backbone"])
        self.backbone = backbone
        self.backbone.requires_grad_(False)
        self.backbone.eval()
        self.lrs = [float(lr) for lr in lrs]
        self.batch_size = int(batch_size)
        self.n_last_blocks = int(n_last_blocks)
        self.avgpool_patchtokens = bool(avgpool_patchtokens)
        self.momentum = float(momentum)
        self.weight_decay = float(weight_decay)
        self.feature_dim = int(backbone.embed_dim) * (self.n_last_blocks + int(self.avgpool_patchtokens))
        generator = torch.Generator().manual_seed(int(seed))
        self.heads = nn.ModuleList()
        for _ in self.lrs:
            # skip_init: nn.Linear's own init would draw from the global generator, so the grid's size would
            # change the data order and augmentations that follow
            head = nn.utils.skip_init(nn.Linear, self.feature_dim, num_classes)
            with torch.no_grad():
                head.weight.copy_(torch.randn(head.weight.shape, generator=generator) * 0.01)
                head.bias.zero_()
            self.heads.append(head)
        top_k = min(5, num_classes)
        self.top1 = nn.ModuleList(MulticlassAccuracy(num_classes, top_k=1, average="micro") for _ in self.lrs)
        self.top5 = nn.ModuleList(
            MulticlassAccuracy(num_classes, top_k=top_k, average="micro") for _ in self.lrs
        )
        self.history: list[dict[str, Any]] = []
        self.effective_lrs: list[float] = []

    def train(self, mode: bool = True) -> LinearProbeModule:
        """Put the heads in ``mode``; the backbone always stays in eval mode (frozen, as DINO's probe)."""
        super().train(mode)
        self.backbone.eval()
        return self

    def features(self, images: Tensor) -> Tensor:
        with torch.no_grad():
            feats = probe_features(self.backbone, images, self.n_last_blocks, self.avgpool_patchtokens)
        return feats.float()

    def forward(self, images: Tensor) -> list[Tensor]:
        """Logits (B, classes) of every head."""
        feats = self.features(images)
        return [head(feats) for head in self.heads]

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, labels = batch
        losses = [F.cross_entropy(logits.float(), labels) for logits in self(images)]
        loss = torch.stack(losses).sum()  # each head's gradient comes from its own loss only
        self.log("train/loss", loss.detach() / len(losses), prog_bar=True, batch_size=len(labels))
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        images, labels = batch
        for logits, top1, top5 in zip(self(images), self.top1, self.top5, strict=True):
            top1.update(logits.float(), labels)
            top5.update(logits.float(), labels)

    def on_validation_epoch_end(self) -> None:
        # percent, rounded to 1e-4 (float32 accuracies carry noise in the 7th digit)
        top1 = [round(100.0 * float(m.compute()), 4) for m in self.top1]
        top5 = [round(100.0 * float(m.compute()), 4) for m in self.top5]
        for metric in (*self.top1, *self.top5):
            metric.reset()
        if self.trainer.sanity_checking:
            return
        self.history.append({"epoch": self.current_epoch + 1, "top1": top1, "top5": top5})
        single = len(self.lrs) == 1
        for lr, a1, a5 in zip(self.lrs, top1, top5, strict=True):
            key = "val" if single else f"val/{lr_key(lr)}"
            self.log(f"{key}/top1", a1, sync_dist=False)
            self.log(f"{key}/top5", a5, sync_dist=False)

    def configure_optimizers(self) -> dict[str, Any]:
        trainer = self.trainer
        global_batch = self.batch_size * trainer.world_size * trainer.accumulate_grad_batches
        self.effective_lrs = [lr * global_batch / 256.0 for lr in self.lrs]
        groups = [
            {"params": list(head.parameters()), "lr": lr}
            for head, lr in zip(self.heads, self.effective_lrs, strict=True)
        ]
        optimizer = torch.optim.SGD(groups, momentum=self.momentum, weight_decay=self.weight_decay)
        total = max(1, int(trainer.estimated_stepping_batches))

        def cosine(step: int) -> float:
            return 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class LinearProbeEvaluator(Evaluator):
    """Linear probe of a frozen backbone on an ImageFolder data set (spec D; DINO eval_linear).

    Args:
        data_dir, image_size, batch_size, num_workers, which, output_dir: see :class:`evaluators.base.Evaluator`.
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
        kwargs = dict(trainer_kwargs)
        given = kwargs.get("max_epochs")
        if given is not None and given != self.epochs:
            warnings.warn(
                f"trainer max_epochs={given} is replaced by the linear probe's epochs={self.epochs}",
                UserWarning,
                stacklevel=3,
            )
        kwargs["max_epochs"] = self.epochs
        # LightningCLI passes every Trainer option, unset ones as None: fill those too
        defaults: dict[str, Any] = {
            "num_sanity_val_steps": 0,
            "check_val_every_n_epoch": 1,
            "enable_checkpointing": False,  # the head is cheap to retrain; keep runs/*/checkpoints for pretraining
            "default_root_dir": self.output_dir,
        }
        for key, value in defaults.items():
            if kwargs.get(key) is None and value is not None:
                kwargs[key] = value
        return kwargs

    def evaluate(self, backbone: VisionTransformer, trainer_kwargs: dict[str, Any]) -> dict[str, float]:
        """Train the probe(s) for ``epochs`` epochs with ``Trainer(**trainer_kwargs)`` and return the metrics.

        See :func:`summarize` for the metric names. The backbone's ``requires_grad`` flags and train/eval mode are
        restored afterwards. Raises ``ValueError`` for a bad data layout or ``n_last_blocks`` > the backbone's depth.
        """
        depth = len(backbone.blocks)
        if self.n_last_blocks > depth:
            raise ValueError(f"n_last_blocks={self.n_last_blocks} exceeds the backbone's depth {depth}")
        pl.seed_everything(self.seed, workers=True, verbose=False)
        data = self.datamodule()
        data.setup("fit")
        assert data.train_dataset is not None and data.val_dataset is not None
        self.data_facts = {
            "num_classes": data.num_classes,
            "train_images": len(data.train_dataset),
            "val_images": len(data.val_dataset),
        }
        grads = {name: p.requires_grad for name, p in backbone.named_parameters()}
        was_training = backbone.training
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
        try:
            trainer = pl.Trainer(**self.trainer_kwargs(trainer_kwargs))
            if getattr(trainer.strategy, "_start_method", "popen") != "popen" and trainer.world_size > 1:
                raise ValueError(
                    f"the linear probe cannot run under a spawned/forked strategy "
                    f"({type(trainer.strategy).__name__}, start method {trainer.strategy._start_method!r}): its "
                    "per-epoch results would stay in the worker processes; use --trainer.strategy ddp"
                )
            with warnings.catch_warnings():  # the frozen backbone is in eval mode on purpose
                warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
                trainer.fit(module, datamodule=data)
        finally:
            for name, p in backbone.named_parameters():
                p.requires_grad_(grads[name])
            backbone.train(was_training)
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
            mine["val_history"] = self.history  # per validated epoch: top-1 / top-5 per head (base_lrs order)
        return {**super().protocol(), **mine}
