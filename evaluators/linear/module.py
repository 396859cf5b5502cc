"""The Lightning module of the linear probe (:class:`~evaluators.linear.evaluator.LinearProbeEvaluator`) and its feature.

:class:`LinearProbeModule` trains one ``nn.Linear`` per base lr on the frozen backbone's :func:`probe_features` and
records top-1 / top-5 after every validation epoch; see :mod:`evaluators.linear.evaluator` for the protocol.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn
from torchmetrics.aggregation import SumMetric
from torchmetrics.classification import MulticlassAccuracy

from dora_lightning.evaluation.probe import syncs_across_its_trainer
from dora_lightning.models.backbone import last_block_tokens, last_n_block_cls

__all__ = ["LinearProbeModule", "lr_key", "probe_features"]


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
    outs = last_block_tokens(backbone, images, n_last_blocks, prefix_tokens=True)
    cls = [prefix[:, 0] for _patches, prefix in outs]
    return torch.cat([*cls, outs[-1][0].mean(dim=1)], dim=-1)


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

    After every validation epoch (not the sanity check) ``history`` gets ``{"epoch", "top1", "top5", "images"}``: one
    accuracy per head, in percent (top-5 is top-min(5, num_classes)), and the number of validation images scored,
    summed over processes. Under DDP the validation loader must not repeat images (see
    :func:`dora_lightning.evaluation.samplers.unrepeated_sampler`), or the repeats count twice.
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
        sync = {"distributed_available_fn": syncs_across_its_trainer(self)}
        self.top1 = nn.ModuleList(
            MulticlassAccuracy(num_classes, top_k=1, average="micro", **sync) for _ in self.lrs
        )
        self.top5 = nn.ModuleList(
            MulticlassAccuracy(num_classes, top_k=top_k, average="micro", **sync) for _ in self.lrs
        )
        self.val_images = SumMetric(**sync)  # images scored per validation, summed over processes
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
        self.val_images.update(float(len(labels)))

    def on_validation_epoch_end(self) -> None:
        # percent, rounded to 1e-4 (float32 accuracies carry noise in the 7th digit)
        top1 = [round(100.0 * float(m.compute()), 4) for m in self.top1]
        top5 = [round(100.0 * float(m.compute()), 4) for m in self.top5]
        images = int(self.val_images.compute())
        for metric in (*self.top1, *self.top5, self.val_images):
            metric.reset()
        if self.trainer.sanity_checking:
            return
        self.history.append({"epoch": self.current_epoch + 1, "top1": top1, "top5": top5, "images": images})
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
