"""Linear semantic segmentation on frozen patch tokens (Pascal VOC 2012, ADE20K); see docs/evaluation.md.

The backbone is frozen and kept in eval mode. The feature of a patch is its final-normed token of the last block
(or the last ``n_last_blocks`` blocks, concatenated); a 1x1 convolution (weights N(0, 0.01), bias 0) maps it to class
logits on the patch grid, which are upsampled bilinearly to the label size. The head is trained with cross-entropy
(ignore index 255) on RandomResizedCrop + flip crops of ``image_size`` for ``epochs`` epochs (AdamW or SGD, poly
decay per step), then validated once: each image is resized to short side ``image_size`` (long side rounded to the
patch size), its logits are upsampled to the original mask size and scored. Reported: mIoU (mean over the classes
present in the ground truth or the predictions) and pixel accuracy, in percent; per-class IoU in the results file.

This is the frozen linear protocol, not the UperNet fine-tuning (iBOT's recipe) behind the paper's ADE20K table.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, ClassVar, Literal

import lightning.pytorch as pl
from timm.models.vision_transformer import VisionTransformer

from dora_lightning.evaluation.contract import Evaluator
from dora_lightning.evaluation.loader_limits import refuse_cut_splits
from dora_lightning.evaluation.probe import (
    check_n_last_blocks,
    frozen_backbone,
    probe_trainer_kwargs,
    refuse_spawned_strategy,
)
from dora_lightning.models.backbone import patch_size_of
from evaluators.segmentation.data import SegmentationDataModule
from evaluators.segmentation.module import SegmentationHeadModule, patch_features, segmentation_scores

__all__ = ["SegmentationEvaluator", "SegmentationHeadModule", "patch_features", "segmentation_scores"]

PREFIX = "segmentation"


class SegmentationEvaluator(Evaluator):
    """Linear segmentation probe of a frozen backbone on Pascal VOC 2012 or ADE20K.

    Args:
        data_dir: the VOC 2012 folder (``VOCdevkit/VOC2012``) or ADE20K folder (``ADEChallengeData2016``), or a
            folder holding one of them; see :mod:`evaluators.segmentation.data`.
        image_size: training crop side and evaluation short side (a multiple of the patch size).
        batch_size: images per batch per process, training and validation.
        num_workers, which, output_dir: see :class:`dora_lightning.evaluation.contract.Evaluator`.
        dataset: ``auto`` (recognise the layout), ``voc`` or ``ade20k``.
        num_classes: default 21 (VOC) or 150 (ADE20K); a mask value beyond it is an error naming the file.
        n_last_blocks: patch tokens of this many last blocks are concatenated (each after the final norm).
        epochs: training epochs; sets the Trainer's ``max_epochs``. Validation runs once, after training.
        optimizer: ``adamw`` or ``sgd``.
        lr: peak learning rate (as given, not scaled by the batch size); poly decay (power 0.9) to 0 per step.
        weight_decay: of the optimizer.
        momentum: of SGD (ignored by AdamW).
        crop_scale: RandomResizedCrop's area range (fraction of the image) for training crops.
        seed: seeds data order, augmentation and the head's initialisation.
    """

    name: ClassVar[str] = "segmentation"

    def __init__(
        self,
        data_dir: str = "data/VOCdevkit/VOC2012",
        image_size: int = 512,
        batch_size: int = 16,
        num_workers: int = 2,
        which: Literal["teacher", "student"] = "teacher",
        output_dir: str | None = None,
        dataset: Literal["auto", "voc", "ade20k"] = "auto",
        num_classes: int | None = None,
        n_last_blocks: int = 1,
        epochs: int = 20,
        optimizer: Literal["adamw", "sgd"] = "adamw",
        lr: float = 0.001,
        weight_decay: float = 0.0001,
        momentum: float = 0.9,
        crop_scale: tuple[float, float] = (0.25, 1.0),
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
        if dataset not in ("auto", "voc", "ade20k"):
            raise ValueError(f"dataset must be 'auto', 'voc' or 'ade20k', got {dataset!r}")
        if num_classes is not None and not 2 <= num_classes <= 255:
            raise ValueError(f"num_classes must be in 2..255 (255 marks ignored pixels), got {num_classes}")
        if n_last_blocks < 1:
            raise ValueError(f"n_last_blocks must be >= 1, got {n_last_blocks}")
        if epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {epochs}")
        if optimizer not in ("adamw", "sgd"):
            raise ValueError(f"optimizer must be 'adamw' or 'sgd', got {optimizer!r}")
        if not lr >= 0 or not weight_decay >= 0:
            raise ValueError(f"lr and weight_decay must be >= 0, got lr={lr}, weight_decay={weight_decay}")
        low, high = (float(v) for v in crop_scale)
        if not 0 < low <= high <= 1:
            raise ValueError(
                f"crop_scale must be (low, high) with 0 < low <= high <= 1, got {tuple(crop_scale)}"
            )
        self.dataset = dataset
        self.num_classes = num_classes
        self.n_last_blocks = int(n_last_blocks)
        self.epochs = int(epochs)
        self.optimizer = optimizer
        self.lr = float(lr)
        self.weight_decay = float(weight_decay)
        self.momentum = float(momentum)
        self.crop_scale = (low, high)
        self.seed = int(seed)
        self.scores: dict[str, Any] = {}
        self.data_facts: dict[str, Any] = {}

    def datamodule(self, patch_size: int) -> SegmentationDataModule:
        """The data module for a backbone with ``patch_size``."""
        return SegmentationDataModule(
            self.data_dir,
            dataset=self.dataset,
            num_classes=self.num_classes,
            image_size=self.image_size,
            patch_size=patch_size,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            crop_scale=self.crop_scale,
        )

    def build_module(self, backbone: VisionTransformer, num_classes: int) -> SegmentationHeadModule:
        """The head module trained and validated by :meth:`evaluate`."""
        return SegmentationHeadModule(
            backbone,
            num_classes,
            n_last_blocks=self.n_last_blocks,
            optimizer=self.optimizer,
            lr=self.lr,
            weight_decay=self.weight_decay,
            momentum=self.momentum,
            seed=self.seed,
        )

    def trainer_kwargs(self, trainer_kwargs: dict[str, Any]) -> dict[str, Any]:
        """The given Trainer arguments with ``max_epochs = epochs`` and evaluation defaults for absent/None options
        (no sanity check, no checkpoints, ``output_dir`` as root)."""
        return probe_trainer_kwargs(
            trainer_kwargs, self.epochs, self.output_dir, "the segmentation evaluator"
        )

    def evaluate(self, backbone: VisionTransformer, trainer_kwargs: dict[str, Any]) -> dict[str, float]:
        """Train the head for ``epochs`` epochs, validate once, and return ``segmentation/mIoU`` and
        ``segmentation/pixel_acc`` (percent). The backbone's ``requires_grad`` flags and mode are restored after.

        Raises ``ValueError`` for a bad data layout, ``n_last_blocks`` beyond the backbone's depth, an
        ``image_size`` that is not a multiple of the patch size, or a Trainer batch limit that would cut the training
        or validation images.
        """
        check_n_last_blocks(backbone, self.n_last_blocks)
        patch_h = patch_size_of(backbone)
        if self.image_size % patch_h:
            raise ValueError(
                f"image_size {self.image_size} is not a multiple of the backbone's patch size {patch_h}"
            )
        pl.seed_everything(self.seed, workers=True, verbose=False)
        data = self.datamodule(int(patch_h))
        data.setup("fit")
        assert data.train_dataset is not None and data.val_dataset is not None
        self.data_facts = {
            "layout": data.layout,
            "layout_path": str(data.data_root.resolve()) if data.data_root else None,
            "num_classes": data.num_classes,
            "class_names": data.class_names,
            "train_images": len(data.train_dataset),
            "val_images": len(data.val_dataset),
            "patch_size": int(patch_h),
        }
        with (
            frozen_backbone(backbone),
            warnings.catch_warnings(),
        ):  # entered before the head module freezes it
            module = self.build_module(backbone, data.num_classes)
            warnings.filterwarnings("ignore", message=r"You defined a `validation_step` but have no")
            trainer = pl.Trainer(**self.trainer_kwargs(trainer_kwargs))
            refuse_spawned_strategy(trainer, "the segmentation evaluator")
            refuse_cut_splits(
                trainer, self.batch_size, self.data_facts["train_images"], self.data_facts["val_images"]
            )
            trainer.fit(module, train_dataloaders=data.train_dataloader())
            trainer.validate(
                module,
                dataloaders=data.val_dataloader(trainer.global_rank, trainer.world_size),
                verbose=False,
            )
        self.module = module
        if not module.scores:
            raise ValueError("no validation results: the head was never validated (check limit_val_batches)")
        self.scores = dict(module.scores)
        return {
            f"{PREFIX}/mIoU": round(100.0 * self.scores["miou"], 4),
            f"{PREFIX}/pixel_acc": round(100.0 * self.scores["pixel_acc"], 4),
        }

    def per_class_iou(self) -> dict[str, float | None]:
        """IoU per class name in percent after :meth:`evaluate`; None for a class neither labelled nor predicted."""
        names = self.data_facts.get("class_names", [])
        return {
            name: None if math.isnan(iou) else round(100.0 * iou, 4)
            for name, iou in zip(names, self.scores.get("iou", []), strict=False)
        }

    def protocol(self) -> dict[str, Any]:
        mine: dict[str, Any] = {
            "protocol": "linear (frozen backbone), not the UperNet fine-tuning of the paper's ADE20K table",
            "feature": f"concat of the final-normed patch tokens of the last {self.n_last_blocks} block(s)",
            "head": "nn.Conv2d(d * n_last_blocks, num_classes, 1), weight N(0, 0.01), bias 0; backbone frozen, eval mode",
            "loss": "cross-entropy on logits upsampled (bilinear) to the crop, ignore index 255",
            "optimizer_detail": (
                f"AdamW(lr={self.lr}, weight_decay={self.weight_decay})"
                if self.optimizer == "adamw"
                else f"SGD(lr={self.lr}, momentum={self.momentum}, weight_decay={self.weight_decay})"
            ),
            "schedule": "poly: lr * (1 - step / total_steps) ** 0.9, per step, no warm-up",
            "train_transform": (
                f"RandomResizedCrop({self.image_size}, scale={self.crop_scale}) + horizontal flip, "
                "image bilinear, mask nearest"
            ),
            "eval_transform": (
                f"resize to short side {self.image_size} (bilinear), long side rounded to the patch size; logits "
                "upsampled (bilinear) to the original mask size"
            ),
            "metrics": (
                "from one confusion matrix over all validation pixels (label 255 ignored): mIoU = mean IoU over the "
                "classes present in the ground truth or predictions; pixel_acc = correct / labelled pixels"
            ),
            "metric_unit": "percent",
        }
        if self.scores:  # facts learnt while evaluating
            mine.update({k: v for k, v in self.data_facts.items() if k != "class_names"})
            mine["classes_scored"] = self.scores["classes_scored"]
            mine["val_pixels_scored"] = self.scores["pixels"]
            mine["per_class_iou"] = self.per_class_iou()
        return {**super().protocol(), **mine}
