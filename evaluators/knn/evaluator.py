"""Weighted k-NN classification on frozen features (DINO ``eval_knn.py``, spec D).

Feature: the backbone's CLS token after the final norm (``forward_features(model, x)[0]``), L2-normalised. The
training images (eval transform, unshuffled) fill a feature bank; each validation image takes the top-k training
images by cosine similarity and each neighbour votes for its class with weight ``exp(sim / T)``; top-1 and top-5
accuracies (in percent) are reported for every k. k in {10, 20, 100, 200} and T = 0.07 by default.

Run as one ``trainer.validate(module, dataloaders=[bank_loader, val_loader])``: dataloader 0 fills the bank,
dataloader 1 is scored against it. Under DDP the bank is all-gathered (every process scores its share of the
validation images against the whole bank) and the per-image results are all-gathered at the end; images that
Lightning's DistributedSampler repeats to even out the shards are counted once, by dataset index.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from dora_lightning.core.precision import fp32_region
from dora_lightning.evaluation.contract import Evaluator, EvaluatorSettingError
from dora_lightning.models.backbone import forward_features

__all__ = ["KNNEvaluator", "KNNModule", "knn_classify", "knn_metric_names"]


def _check_knn_args(ks: Sequence[int], temperature: float, chunk_size: int) -> list[int]:
    ks = [int(k) for k in ks]
    if not ks:
        raise ValueError("ks must hold at least one k")
    if any(k < 1 for k in ks):
        raise ValueError(f"every k must be >= 1, got ks={ks}")
    if len(set(ks)) != len(ks):
        raise ValueError(f"ks must not repeat a k, got ks={ks}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return ks


@torch.no_grad()
def knn_classify(
    train_features: Tensor,
    train_labels: Tensor,
    query_features: Tensor,
    num_classes: int,
    ks: Sequence[int] = (10, 20, 100, 200),
    temperature: float = 0.07,
    chunk_size: int = 1024,
) -> dict[int, Tensor]:
    """Class scores of weighted k-NN voting (DINO ``eval_knn.knn_classifier``) for every k in ``ks``.

    Args:
        train_features: (N, d) L2-normalised bank features.
        train_labels: (N,) int class indices in ``[0, num_classes)``.
        query_features: (M, d) L2-normalised query features.
        num_classes: number of classes C.
        ks: numbers of neighbours; each must be <= N.
        temperature: T of the vote weight ``exp(cosine similarity / T)``.
        chunk_size: queries compared with the bank at once: memory is O(chunk_size x N), never O(M x N).

    Returns:
        ``{k: (M, C) float32 scores}``: the summed vote weights of the k most similar bank features per class
        (``scores.argmax(1)`` is the top-1 prediction, ``scores.topk(5).indices`` the top-5). The neighbours of the
        largest k are found once (sorted by similarity) and the first k used for each smaller k.
    """
    ks = _check_knn_args(ks, temperature, chunk_size)
    if train_features.ndim != 2 or query_features.ndim != 2:
        raise ValueError(
            f"features must be 2-D (N, d); got bank {tuple(train_features.shape)}, queries {tuple(query_features.shape)}"
        )
    if train_features.shape[1] != query_features.shape[1]:
        raise ValueError(
            f"bank features have dim {train_features.shape[1]}, queries {query_features.shape[1]}; they must match"
        )
    if train_labels.shape != (train_features.shape[0],):
        raise ValueError(
            f"train_labels must have shape ({train_features.shape[0]},), got {tuple(train_labels.shape)}"
        )
    bank_size = train_features.shape[0]
    k_max = max(ks)
    if k_max > bank_size:
        raise ValueError(
            f"k={k_max} exceeds the {bank_size} bank features; use ks with every k <= {bank_size}"
        )
    labels = train_labels.long()
    if bank_size and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(
            f"train_labels must lie in [0, {num_classes}), got [{int(labels.min())}, {int(labels.max())}]"
        )
    bank = train_features.float()
    scores = {
        k: query_features.new_zeros((query_features.shape[0], num_classes), dtype=torch.float32) for k in ks
    }
    with fp32_region(query_features.device):  # under bf16/16-mixed too: the similarities and votes in float32
        for start in range(0, query_features.shape[0], chunk_size):
            queries = query_features[start : start + chunk_size].float()
            similarity = queries @ bank.T  # (chunk, N)
            top_sim, top_idx = similarity.topk(k_max, dim=1, largest=True, sorted=True)
            del similarity
            weights = (top_sim / temperature).exp()  # (chunk, k_max)
            neighbour_labels = labels[top_idx]  # (chunk, k_max)
            for k in ks:
                scores[k][start : start + chunk_size].scatter_add_(1, neighbour_labels[:, :k], weights[:, :k])
    return scores


def knn_metric_names(ks: Sequence[int]) -> list[str]:
    """The metric keys of :class:`KNNModule`, in order: ``knn/top1_k{k}``, ``knn/top5_k{k}`` for each k."""
    return [f"knn/top{n}_k{k}" for k in ks for n in (1, 5)]


def _dedup_by_index(index: Tensor) -> Tensor:
    """Positions of the first occurrence of each value of ``index`` (DistributedSampler repeats a few samples)."""
    order = torch.argsort(index, stable=True)
    ordered = index[order]
    keep = torch.ones_like(ordered, dtype=torch.bool)
    keep[1:] = ordered[1:] != ordered[:-1]
    return order[keep]


class KNNModule(pl.LightningModule):
    """Weighted k-NN evaluation of a frozen backbone, run by ``trainer.validate(dataloaders=[bank, queries])``.

    Batches are ``(images, labels, dataset_index)``; ``dataloader_idx`` 0 fills the feature bank, 1 is scored
    against it. After the run, :attr:`metrics` holds ``knn/top1_k{k}`` and ``knn/top5_k{k}`` in percent (also
    logged). Top-5 counts the ``min(5, k, num_classes)`` best-scored classes, as DINO does.

    Args:
        backbone: a timm ViT; frozen (``requires_grad_(False)``) and kept in eval mode.
        num_classes: number of classes.
        ks, temperature, chunk_size: as in :func:`knn_classify`.
    """

    def __init__(
        self,
        backbone: VisionTransformer,
        num_classes: int,
        ks: Sequence[int] = (10, 20, 100, 200),
        temperature: float = 0.07,
        chunk_size: int = 1024,
    ) -> None:
        super().__init__()
        self.ks = _check_knn_args(ks, temperature, chunk_size)
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.backbone = backbone.requires_grad_(False).eval()
        self.num_classes = int(num_classes)
        self.temperature = float(temperature)
        self.chunk_size = int(chunk_size)
        self.metrics: dict[str, float] = {}
        self.bank_size = 0
        self.query_count = 0
        self._reset()

    def _reset(self) -> None:
        self._bank_parts: list[tuple[Tensor, Tensor, Tensor]] = []
        self._bank: tuple[Tensor, Tensor] | None = None
        # per query batch: (dataset indices (B,), correct (B, len(ks), 2) for top-1 / top-5)
        self._results: list[tuple[Tensor, Tensor]] = []

    def train(self, mode: bool = True) -> KNNModule:
        super().train(mode)
        self.backbone.eval()  # frozen features: no dropout, whatever Lightning asks
        return self

    @torch.no_grad()
    def features(self, images: Tensor) -> Tensor:
        """L2-normalised final-norm CLS features (float32) of a batch of images."""
        cls, _patches = forward_features(self.backbone, images)
        return F.normalize(cls.float(), dim=-1)

    def on_validation_epoch_start(self) -> None:
        self._reset()
        self.metrics = {}

    def _gather_rows(self, tensor: Tensor) -> Tensor:
        """Concatenate ``tensor`` (rows may differ per process) over all processes, in rank order."""
        if self.trainer.world_size <= 1:
            return tensor
        count = torch.tensor([tensor.shape[0]], device=tensor.device)
        counts = self.all_gather(count).reshape(-1).tolist()
        padded = tensor.new_zeros((max(counts), *tensor.shape[1:]))
        padded[: tensor.shape[0]] = tensor
        gathered = self.all_gather(padded)  # (world, max, ...)
        return torch.cat([gathered[rank, :n] for rank, n in enumerate(counts)])

    def _finalise_bank(self) -> tuple[Tensor, Tensor]:
        if self._bank is None:
            dim = int(getattr(self.backbone, "num_features", self.backbone.embed_dim))
            if self._bank_parts:
                feats, labels, index = (torch.cat(parts) for parts in zip(*self._bank_parts, strict=True))
            else:  # this process got no bank batch
                feats = torch.zeros((0, dim), device=self.device)
                labels = index = torch.zeros((0,), dtype=torch.long, device=self.device)
            feats, labels, index = (self._gather_rows(t) for t in (feats, labels.long(), index.long()))
            keep = _dedup_by_index(index)
            self._bank = (feats[keep], labels[keep])
            self._bank_parts = []
            self.bank_size = int(self._bank[0].shape[0])
            if self.bank_size < max(self.ks):
                raise ValueError(
                    f"k={max(self.ks)} exceeds the {self.bank_size} training images of the feature bank; "
                    f"use ks with every k <= {self.bank_size}"
                )
        return self._bank

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        images, labels, index = batch
        features = self.features(images)
        if dataloader_idx == 0:
            if self._bank is not None:
                raise RuntimeError(
                    "KNNModule got bank batches after query batches; pass [bank_loader, val_loader]"
                )
            self._bank_parts.append((features, labels, index))
            return
        if dataloader_idx != 1:
            raise RuntimeError(
                f"KNNModule takes two dataloaders (bank, queries), got dataloader_idx={dataloader_idx}"
            )
        bank_features, bank_labels = self._finalise_bank()
        scores = knn_classify(
            bank_features, bank_labels, features, self.num_classes, self.ks, self.temperature, self.chunk_size
        )
        correct = []
        for k in self.ks:
            top = scores[k].topk(min(5, k, self.num_classes), dim=1).indices  # (B, n5), best first
            hits = top == labels.view(-1, 1)
            correct.append(torch.stack([hits[:, 0], hits.any(dim=1)], dim=1))
        self._results.append((index.long(), torch.stack(correct, dim=1)))

    def on_validation_epoch_end(self) -> None:
        if self._bank is None and not self._results:
            self._finalise_bank()  # keep the collective calls matched when this process saw no query batch
        if self._results:
            index = torch.cat([r[0] for r in self._results])
            correct = torch.cat([r[1] for r in self._results])
        else:
            index = torch.zeros((0,), dtype=torch.long, device=self.device)
            correct = torch.zeros((0, len(self.ks), 2), dtype=torch.bool, device=self.device)
        index = self._gather_rows(index)
        correct = self._gather_rows(correct.to(torch.uint8)).bool()
        keep = _dedup_by_index(index)
        correct = correct[keep]
        self.query_count = int(correct.shape[0])
        if self.query_count == 0:
            raise ValueError("k-NN: no validation images were scored")
        hits = correct.long().sum(dim=0).tolist()  # (len(ks), 2) counts
        metrics: dict[str, float] = {}
        for i, k in enumerate(self.ks):
            metrics[f"knn/top1_k{k}"] = 100.0 * hits[i][0] / self.query_count
            metrics[f"knn/top5_k{k}"] = 100.0 * hits[i][1] / self.query_count
        self.metrics = metrics
        # identical in every process (computed from gathered results); sync_dist averages equal values
        self.log_dict(metrics, sync_dist=True, add_dataloader_idx=False)
        self._reset()


class _Indexed(Dataset):
    """A dataset whose samples ``(image, label)`` become ``(image, label, index)``."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Any, Any, int]:
        image, label = self.dataset[index][:2]
        return image, label, index


def _indexed_loader(loader: DataLoader) -> DataLoader:
    """The same loader (batch size, workers, order) over ``(image, label, index)`` samples."""
    return DataLoader(
        _Indexed(loader.dataset),
        batch_size=loader.batch_size,
        shuffle=False,
        num_workers=loader.num_workers,
        pin_memory=loader.pin_memory,
        persistent_workers=loader.num_workers > 0 and getattr(loader, "persistent_workers", False),
        drop_last=False,
    )


class KNNEvaluator(Evaluator):
    """Weighted k-NN classification on the frozen backbone's CLS features (DINO eval_knn; spec D, G.7).

    The training images of ``data_dir`` (Resize + CenterCrop, no augmentation) fill the feature bank; the validation
    images are classified by the top-k most similar training images, each voting with weight exp(cosine / T).
    Reports ``knn/top1_k{k}`` and ``knn/top5_k{k}`` in percent for every k. A Trainer batch limit that would cut the
    bank or the validation images is refused (:func:`dora_lightning.evaluation.loader_limits.refuse_cut_images`).

    Args:
        ks: numbers of neighbours (each at most the number of training images).
        temperature: T of the vote weight exp(similarity / T).
        chunk_size: validation images compared with the bank at once (memory: chunk_size x training images).
        data_dir, image_size, batch_size, num_workers, which, output_dir: see :class:`dora_lightning.evaluation.contract.Evaluator`.
    """

    name = "knn"

    def __init__(
        self,
        ks: list[int] = [10, 20, 100, 200],  # noqa: B006 - jsonargparse shows the list default in --help
        temperature: float = 0.07,
        chunk_size: int = 1024,
        data_dir: str = "assets/fashion_mnist",
        image_size: int = 224,
        batch_size: int = 256,
        num_workers: int = 2,
        which: Literal["teacher", "student"] = "teacher",
        output_dir: str | None = None,
    ) -> None:
        super().__init__(
            data_dir=data_dir,
            image_size=image_size,
            batch_size=batch_size,
            num_workers=num_workers,
            which=which,
            output_dir=output_dir,
        )
        self.ks = _check_knn_args(ks, temperature, chunk_size)
        self.temperature = float(temperature)
        self.chunk_size = int(chunk_size)
        self._data_facts: dict[str, Any] = {}

    def evaluate(self, backbone: VisionTransformer, trainer_kwargs: dict[str, Any]) -> dict[str, float]:
        from dora_lightning.evaluation.image_data import ImageFolderDataModule
        from dora_lightning.evaluation.loader_limits import refuse_cut_images

        data = ImageFolderDataModule(
            self.data_dir,
            image_size=self.image_size,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            train_augment=False,
        )
        data.setup("validate")
        bank_loader, val_loader = data.train_eval_dataloader(), data.val_dataloader()
        train_images = len(bank_loader.dataset)  # type: ignore[arg-type]
        if max(self.ks) > train_images:
            raise EvaluatorSettingError(
                f"k={max(self.ks)} exceeds the {train_images} training images in '{self.data_dir}/train'; "
                f"pass ks with every k <= {train_images}, e.g. --evaluator.ks '[10,20]'"
            )
        val_images = len(val_loader.dataset)  # type: ignore[arg-type]
        module = KNNModule(backbone, data.num_classes, self.ks, self.temperature, self.chunk_size)
        trainer = pl.Trainer(**trainer_kwargs)
        # a batch limit (limit_val_batches, fast_dev_run, ...) would score a subset against a part of the bank
        refuse_cut_images(
            trainer,
            self.batch_size,
            [
                ("val", train_images, f"the {train_images} training images (the k-NN memory bank)"),
                ("val", val_images, f"the {val_images} validation images"),
            ],
        )
        trainer.validate(
            module, dataloaders=[_indexed_loader(bank_loader), _indexed_loader(val_loader)], verbose=False
        )
        self._data_facts = {
            "num_classes": data.num_classes,
            "train_images": train_images,
            "val_images": val_images,
            "bank_images": module.bank_size,  # the counts used: all of them, limits that cut are refused above
            "query_images": module.query_count,
        }
        return dict(module.metrics)

    def protocol(self) -> dict[str, Any]:
        return {
            **super().protocol(),
            "feature": f"{self.which} CLS token after the final norm, L2-normalised",
            "vote": "sum over the top-k neighbours of exp(cosine similarity / temperature) per class",
            "eval_transform": f"Resize({int(self.image_size * (256 / 224))}, bicubic) + CenterCrop({self.image_size}) "
            "+ ImageNet mean/std",
            "metric_unit": "percent",
            **self._data_facts,
        }
