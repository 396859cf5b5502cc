"""The Lightning module of the segmentation evaluator: a linear 1x1 head on a frozen ViT's patch tokens.

See :mod:`evaluators.segmentation.evaluator` for the protocol. Scores come from one torchmetrics confusion matrix (synced over
processes under DDP) by :func:`segmentation_scores`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn
from torchmetrics.classification import MulticlassConfusionMatrix

from dora_lightning.evaluation.probe import syncs_across_its_trainer
from dora_lightning.models.backbone import last_block_tokens
from evaluators.segmentation.data import IGNORE_INDEX

__all__ = ["SegmentationHeadModule", "patch_features", "segmentation_scores"]


def patch_features(backbone: VisionTransformer, images: Tensor, n_last_blocks: int = 1) -> Tensor:
    """Final-normed patch tokens of the last ``n_last_blocks`` blocks, concatenated (earliest first) on the
    channel axis, on the patch grid: (B, n_last_blocks * d, H / patch, W / patch). Prefix tokens are dropped."""
    outs = last_block_tokens(backbone, images, n_last_blocks, output_fmt="NCHW")
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)


def segmentation_scores(confmat: Tensor) -> dict[str, Any]:
    """Scores of a (C, C) confusion matrix (rows: ground truth, columns: prediction; ignored pixels left out).

    Returns ``iou`` (list of C floats, NaN for a class absent from both ground truth and predictions), ``miou``
    (mean IoU over the classes that are not NaN: present in the ground truth or predicted), ``pixel_acc``
    (correct / labelled pixels), ``classes_scored`` (how many classes the mean covers) and ``pixels`` (labelled
    pixels scored). Fractions in [0, 1]; NaN scores when no pixel is labelled.
    """
    confmat = confmat.double()
    true_pos = confmat.diag()
    union = confmat.sum(0) + confmat.sum(1) - true_pos
    iou = torch.where(union > 0, true_pos / union.clamp(min=1), torch.full_like(union, math.nan))
    present = ~iou.isnan()
    labelled = confmat.sum()
    return {
        "iou": iou.tolist(),
        "miou": float(iou[present].mean()) if present.any() else math.nan,
        "pixel_acc": float(true_pos.sum() / labelled) if labelled > 0 else math.nan,
        "classes_scored": int(present.sum()),
        "pixels": int(labelled),
    }


class SegmentationHeadModule(pl.LightningModule):
    """Frozen backbone + ``nn.Conv2d(n_last_blocks * d, num_classes, 1)`` on the patch grid.

    Training: logits upsampled (bilinear) to the crop's size, cross-entropy with ignore index 255. Validation: each
    image's logits upsampled to its original label size, argmax, accumulated in a confusion matrix; after each
    validation epoch ``scores`` holds :func:`segmentation_scores` of it (every process gets the same).

    Args:
        backbone: a timm ViT; frozen and kept in eval mode.
        num_classes: classes of the labels.
        n_last_blocks: see :func:`patch_features`.
        optimizer: ``adamw`` or ``sgd`` (momentum ``momentum``).
        lr: peak learning rate (not scaled by the batch size), decayed per step as ``lr * (1 - step/total) ** 0.9``.
        weight_decay: of the optimizer (head weights and bias).
        momentum: SGD's momentum (unused by AdamW).
        seed: seeds the head's initialisation, weights N(0, 0.01) and bias 0 (a private generator).
    """

    def __init__(
        self,
        backbone: VisionTransformer,
        num_classes: int,
        n_last_blocks: int = 1,
        optimizer: Literal["adamw", "sgd"] = "adamw",
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        momentum: float = 0.9,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"segmentation needs at least 2 classes, got {num_classes}")
        if optimizer not in ("adamw", "sgd"):
            raise ValueError(f"optimizer must be 'adamw' or 'sgd', got {optimizer!r}")
        self.save_hyperparameters(ignore=["backbone"])
        self.backbone = backbone
        self.backbone.requires_grad_(False)
        self.backbone.eval()
        self.num_classes = int(num_classes)
        self.n_last_blocks = int(n_last_blocks)
        self.optimizer_name = optimizer
        self.lr, self.weight_decay, self.momentum = float(lr), float(weight_decay), float(momentum)
        in_channels = int(backbone.embed_dim) * self.n_last_blocks
        # skip_init + a private generator: the head's init does not move the global random stream
        self.head = nn.utils.skip_init(nn.Conv2d, in_channels, self.num_classes, 1)
        generator = torch.Generator().manual_seed(int(seed))
        with torch.no_grad():
            self.head.weight.copy_(torch.randn(self.head.weight.shape, generator=generator) * 0.01)
            self.head.bias.zero_()
        self.confmat = MulticlassConfusionMatrix(
            self.num_classes,
            ignore_index=IGNORE_INDEX,
            validate_args=False,
            distributed_available_fn=syncs_across_its_trainer(self),
        )
        self.scores: dict[str, Any] = {}

    def train(self, mode: bool = True) -> SegmentationHeadModule:
        """Put the head in ``mode``; the backbone always stays in eval mode (frozen)."""
        super().train(mode)
        self.backbone.eval()
        return self

    def features(self, images: Tensor) -> Tensor:
        """Frozen features on the patch grid, (B, C, h, w) float32."""
        with torch.no_grad():
            return patch_features(self.backbone, images, self.n_last_blocks).float()

    def forward(self, images: Tensor) -> Tensor:
        """Logits on the patch grid, (B, num_classes, h, w)."""
        return self.head(self.features(images))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, labels = batch
        logits = F.interpolate(
            self(images).float(), size=labels.shape[-2:], mode="bilinear", align_corners=False
        )
        loss = F.cross_entropy(logits, labels.long(), ignore_index=IGNORE_INDEX)
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=len(images))
        return loss

    def predict_labels(self, images: Sequence[Tensor], sizes: Sequence[tuple[int, int]]) -> list[Tensor]:
        """Predicted label maps, one per image at its ``sizes`` entry; images of equal shape share a forward."""
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, image in enumerate(images):
            groups.setdefault(tuple(image.shape), []).append(i)
        predictions: list[Tensor | None] = [None] * len(images)
        for indices in groups.values():
            logits = self(torch.stack([images[i] for i in indices]))
            for row, i in enumerate(indices):
                up = F.interpolate(
                    logits[row : row + 1].float(), size=sizes[i], mode="bilinear", align_corners=False
                )
                predictions[i] = up[0].argmax(dim=0)
        return [p for p in predictions if p is not None]

    def validation_step(self, batch: tuple[list[Tensor], list[Tensor]], batch_idx: int) -> None:
        images, labels = batch
        predictions = self.predict_labels(images, [tuple(mask.shape[-2:]) for mask in labels])
        for prediction, mask in zip(predictions, labels, strict=True):
            self.confmat.update(prediction.flatten(), mask.flatten().long())

    def on_validation_epoch_end(self) -> None:
        self.scores = segmentation_scores(self.confmat.compute())  # torchmetrics syncs over processes
        self.confmat.reset()
        for name in ("miou", "pixel_acc"):
            self.log(f"val/{name}", 100.0 * self.scores[name], sync_dist=True)  # equal on every process

    def configure_optimizers(self) -> dict[str, Any]:
        params = list(self.head.parameters())
        if self.optimizer_name == "adamw":
            optimizer: torch.optim.Optimizer = torch.optim.AdamW(
                params, lr=self.lr, weight_decay=self.weight_decay
            )
        else:
            optimizer = torch.optim.SGD(
                params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay
            )
        total = max(1, int(self.trainer.estimated_stepping_batches))

        def poly(step: int) -> float:
            return (1.0 - min(step, total) / total) ** 0.9

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, poly)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
