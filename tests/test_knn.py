"""k-NN evaluator: chunked voting equals a brute-force reference, the Lightning module, the evaluator on images."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import micro_vit
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from dora_lightning.evaluation.contract import EvaluatorSettingError
from evaluators.knn.evaluator import KNNEvaluator, KNNModule, _dedup_by_index, knn_classify, knn_metric_names

COLOURS = {"blue": (20, 40, 230), "green": (30, 200, 40), "red": (220, 30, 30)}  # sorted names = label order


def write_image_folder(root: Path, train_per_class: int = 4, val_per_class: int = 2, size: int = 36) -> Path:
    """root/{train,val}/{blue,green,red}/*.png: solid colours with a little noise (trivially separable)."""
    rng = np.random.default_rng(0)
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for name, rgb in COLOURS.items():
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = np.clip(np.array(rgb) + rng.integers(-6, 7, size=(size, size, 3)), 0, 255)
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i:03d}.png")
    return root


def brute_force_scores(bank, labels, queries, num_classes, k, temperature):
    """DINO eval_knn.knn_classifier, literally: full similarity matrix, one-hot neighbours, weighted sum."""
    similarity = queries @ bank.T
    distances, indices = similarity.topk(k, largest=True, sorted=True)
    neighbours = labels.view(1, -1).expand(queries.shape[0], -1).gather(1, indices)
    one_hot = torch.zeros(queries.shape[0] * k, num_classes).scatter_(1, neighbours.reshape(-1, 1), 1)
    weights = (distances / temperature).exp()
    return (one_hot.view(queries.shape[0], k, num_classes) * weights.view(queries.shape[0], k, 1)).sum(1)


@pytest.fixture
def features():
    gen = torch.Generator().manual_seed(3)
    bank = F.normalize(torch.randn(57, 8, generator=gen, dtype=torch.float64), dim=1).float()
    labels = torch.randint(0, 5, (57,), generator=gen)
    queries = F.normalize(torch.randn(23, 8, generator=gen, dtype=torch.float64), dim=1).float()
    return bank, labels, queries


@pytest.mark.parametrize("chunk_size", [1, 4, 23, 100])
def test_knn_classify_equals_brute_force(features, chunk_size):
    bank, labels, queries = features
    ks = [1, 3, 10, 57]
    scores = knn_classify(bank, labels, queries, 5, ks, temperature=0.07, chunk_size=chunk_size)
    assert sorted(scores) == ks
    for k in ks:
        expected = brute_force_scores(bank, labels, queries, 5, k, 0.07)
        assert scores[k].shape == (23, 5)
        torch.testing.assert_close(scores[k], expected, rtol=1e-5, atol=1e-6)
        assert torch.equal(scores[k].argmax(1), expected.argmax(1))


def test_knn_classify_stays_float32_under_mixed_precision(features):
    """Under ``--trainer.precision bf16-mixed`` the similarities and votes stay float32 (scatter_add_ of bf16 weights
    into the float32 scores failed before), with the same scores as without autocast."""
    bank, labels, queries = features
    expected = knn_classify(bank, labels, queries, 5, [1, 10], temperature=0.07)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = knn_classify(bank, labels, queries, 5, [1, 10], temperature=0.07)
    for k in (1, 10):
        assert mixed[k].dtype == torch.float32
        torch.testing.assert_close(mixed[k], expected[k], rtol=0, atol=0)


def test_knn_classify_known_answer():
    bank = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]])
    labels = torch.tensor([0, 1, 1])
    query = torch.tensor([[1.0, 0.0]])
    scores = knn_classify(bank, labels, query, num_classes=3, ks=[1, 2, 3], temperature=0.5)
    e = torch.exp
    torch.testing.assert_close(scores[1], torch.tensor([[e(torch.tensor(2.0)), 0.0, 0.0]]))
    torch.testing.assert_close(scores[2], torch.tensor([[e(torch.tensor(2.0)), e(torch.tensor(1.6)), 0.0]]))
    # k=3: class 1 gets exp(1.6) + exp(0) and still loses to class 0's exp(2)
    torch.testing.assert_close(
        scores[3], torch.tensor([[e(torch.tensor(2.0)), e(torch.tensor(1.6)) + 1.0, 0.0]])
    )


def test_knn_classify_never_compares_more_than_a_chunk(features, monkeypatch):
    bank, labels, queries = features
    rows: list[int] = []
    original = torch.Tensor.topk

    def recording_topk(self, *args, **kwargs):
        rows.append(self.shape[0])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "topk", recording_topk)
    knn_classify(bank, labels, queries, 5, [3], chunk_size=4)
    assert rows and max(rows) <= 4
    assert len(rows) == 6  # ceil(23 / 4) chunks


def test_knn_classify_rejects_bad_input(features):
    bank, labels, queries = features
    with pytest.raises(ValueError, match="k=58 exceeds the 57 bank features"):
        knn_classify(bank, labels, queries, 5, [58])
    with pytest.raises(ValueError, match="dim 8, queries 4"):
        knn_classify(bank, labels, queries[:, :4], 5, [3])
    with pytest.raises(ValueError, match="lie in"):
        knn_classify(bank, labels, queries, 3, [3])
    with pytest.raises(ValueError, match="temperature"):
        knn_classify(bank, labels, queries, 5, [3], temperature=0.0)
    with pytest.raises(ValueError, match="repeat"):
        knn_classify(bank, labels, queries, 5, [3, 3])


def test_dedup_keeps_the_first_of_each_index():
    index = torch.tensor([4, 0, 1, 4, 2, 0])
    keep = _dedup_by_index(index)
    assert sorted(index[keep].tolist()) == [0, 1, 2, 4]
    assert sorted(keep.tolist()) == [0, 1, 2, 4]


class _ColourImages(Dataset):
    """(image, label, index) of solid-colour 32x32 tensors with noise; ``repeat`` re-emits sample 0 at the end."""

    def __init__(self, per_class: int, seed: int, repeat: bool = False) -> None:
        gen = torch.Generator().manual_seed(seed)
        colours = torch.tensor(list(COLOURS.values()), dtype=torch.float32) / 127.5 - 1
        self.labels = torch.arange(3).repeat_interleave(per_class)
        self.images = colours[self.labels].view(-1, 3, 1, 1) + 0.02 * torch.randn(
            len(self.labels), 3, 32, 32, generator=gen
        )
        self.order = list(range(len(self.labels))) + ([0] if repeat else [])

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i: int):
        j = self.order[i]
        return self.images[j], self.labels[j], j


def _trainer() -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False, devices=1
    )


def test_knn_module_through_trainer_validate():
    backbone = micro_vit(depth=1)
    module = KNNModule(backbone, num_classes=3, ks=[1, 3], temperature=0.07, chunk_size=2)
    bank = DataLoader(_ColourImages(4, seed=1, repeat=True), batch_size=5)
    queries = DataLoader(_ColourImages(2, seed=2, repeat=True), batch_size=4)
    out = _trainer().validate(module, dataloaders=[bank, queries], verbose=False)
    assert module.bank_size == 12, "the repeated bank image must be counted once"
    assert module.query_count == 6, "the repeated query image must be counted once"
    assert list(module.metrics) == knn_metric_names([1, 3])
    assert module.metrics["knn/top1_k1"] == 100.0 and module.metrics["knn/top1_k3"] == 100.0
    assert module.metrics["knn/top5_k3"] == 100.0
    assert out[0]["knn/top1_k3"] == pytest.approx(100.0)
    assert not any(p.requires_grad for p in backbone.parameters())
    assert not backbone.training


def test_knn_module_matches_knn_classify_on_its_features():
    """The module's accuracy equals knn_classify on features computed outside Lightning (labels kept aligned)."""
    backbone = micro_vit(seed=5, depth=1)
    gen = torch.Generator().manual_seed(0)
    # random images and labels: accuracy well below 100 %, so a misaligned bank would show
    bank_x, query_x = torch.randn(30, 3, 32, 32, generator=gen), torch.randn(12, 3, 32, 32, generator=gen)
    bank_y, query_y = torch.randint(0, 3, (30,), generator=gen), torch.randint(0, 3, (12,), generator=gen)

    def loader(x, y):
        return DataLoader(list(zip(x, y, range(len(y)), strict=True)), batch_size=7)

    module = KNNModule(backbone, num_classes=3, ks=[1, 5], chunk_size=3)
    _trainer().validate(module, dataloaders=[loader(bank_x, bank_y), loader(query_x, query_y)], verbose=False)
    with torch.no_grad():
        bank_f, query_f = module.features(bank_x), module.features(query_x)
    scores = knn_classify(bank_f, bank_y, query_f, 3, [1, 5])
    for k in (1, 5):
        expected = 100.0 * (scores[k].argmax(1) == query_y).float().mean().item()
        assert module.metrics[f"knn/top1_k{k}"] == pytest.approx(expected)


def test_knn_module_refuses_k_larger_than_the_bank():
    module = KNNModule(micro_vit(depth=1), num_classes=3, ks=[20])
    bank = DataLoader(_ColourImages(2, seed=1), batch_size=4)
    queries = DataLoader(_ColourImages(1, seed=2), batch_size=4)
    with pytest.raises(ValueError, match="k=20 exceeds the 6 training images"):
        _trainer().validate(module, dataloaders=[bank, queries], verbose=False)


def test_knn_evaluator_on_an_image_folder(tmp_path):
    root = write_image_folder(tmp_path / "colours")
    evaluator = KNNEvaluator(ks=[1, 3], data_dir=str(root), image_size=32, batch_size=5, num_workers=0)
    trainer_kwargs = {"accelerator": "cpu", "logger": False, "enable_progress_bar": False, "devices": 1}
    metrics = evaluator.evaluate(micro_vit(depth=1), trainer_kwargs)
    assert metrics == {
        "knn/top1_k1": 100.0,
        "knn/top5_k1": 100.0,
        "knn/top1_k3": 100.0,
        "knn/top5_k3": 100.0,
    }
    protocol = evaluator.protocol()
    assert protocol["evaluator"] == "knn" and protocol["ks"] == [1, 3] and protocol["temperature"] == 0.07
    assert protocol["num_classes"] == 3 and protocol["train_images"] == 12 and protocol["val_images"] == 6
    assert protocol["bank_images"] == 12 and protocol["query_images"] == 6  # the counts actually used
    assert protocol["data_path"] == str(root.resolve())
    assert "num_workers" not in protocol and "output_dir" not in protocol
    assert protocol["eval_transform"].startswith("Resize(36, bicubic) + CenterCrop(32)")


def test_knn_evaluator_checks_k_against_the_training_images(tmp_path):
    root = write_image_folder(tmp_path / "colours", train_per_class=2, val_per_class=1)
    evaluator = KNNEvaluator(ks=[10], data_dir=str(root), image_size=32, num_workers=0)
    with pytest.raises(ValueError, match=r"k=10 exceeds the 6 training images.*--evaluator.ks"):
        evaluator.evaluate(micro_vit(depth=1), {"accelerator": "cpu", "logger": False})


@pytest.mark.parametrize(
    ("limit", "message"),
    [
        (
            {"limit_val_batches": 2},
            "--trainer.limit_val_batches 2 would run 2 of the 3 batches (per process) of the 12 training images "
            "(the k-NN memory bank)",
        ),
        ({"limit_val_batches": 0.9}, "--trainer.limit_val_batches 0.9 would run 2 of the 3 batches"),
        ({"fast_dev_run": True}, "--trainer.fast_dev_run True would run 1 of the 3 batches"),
    ],
)
def test_knn_evaluator_refuses_a_batch_limit_that_cuts_the_bank(tmp_path, limit, message):
    """Lightning applies limit_val_batches to the bank loader too: the bank silently shrank to its first batches (a
    few classes, files being in class order) while the results file still said every training image."""
    root = write_image_folder(
        tmp_path / "colours"
    )  # 12 training images (3 batches of 5), 6 validation images
    evaluator = KNNEvaluator(ks=[1, 3], data_dir=str(root), image_size=32, batch_size=5, num_workers=0)
    trainer_kwargs = {"accelerator": "cpu", "logger": False, "enable_progress_bar": False, "devices": 1}
    with pytest.raises(EvaluatorSettingError) as info:
        evaluator.evaluate(micro_vit(depth=1), {**trainer_kwargs, **limit})
    assert str(info.value).startswith(message) and "remove the limit" in str(info.value)


def test_knn_evaluator_refuses_a_batch_limit_that_cuts_the_queries(tmp_path):
    root = write_image_folder(
        tmp_path / "colours", train_per_class=1, val_per_class=4
    )  # 3 bank, 12 query images
    evaluator = KNNEvaluator(ks=[1], data_dir=str(root), image_size=32, batch_size=5, num_workers=0)
    kwargs = {"accelerator": "cpu", "logger": False, "devices": 1, "limit_val_batches": 2}
    with pytest.raises(
        EvaluatorSettingError, match="would run 2 of the 3 batches .* of the 12 validation images"
    ):
        evaluator.evaluate(micro_vit(depth=1), kwargs)


def test_knn_evaluator_validates_its_arguments():
    with pytest.raises(ValueError, match="k must be >= 1"):
        KNNEvaluator(ks=[0])
    with pytest.raises(ValueError, match="chunk_size"):
        KNNEvaluator(chunk_size=0)
    with pytest.raises(ValueError, match="which"):
        KNNEvaluator(which="both")  # type: ignore[arg-type]


@pytest.mark.slow
def test_knn_module_under_ddp_counts_every_image_once():
    """2 CPU processes (gloo): the bank is all-gathered and the 7 (odd) queries, padded by DistributedSampler, are
    counted once, so the metrics equal the single-process run."""
    gen = torch.Generator().manual_seed(3)
    bank_x, query_x = torch.randn(11, 3, 32, 32, generator=gen), torch.randn(7, 3, 32, 32, generator=gen)
    bank_y, query_y = torch.randint(0, 3, (11,), generator=gen), torch.randint(0, 3, (7,), generator=gen)

    def loaders():
        return [
            DataLoader(list(zip(x, y, range(len(y)), strict=True)), batch_size=2)
            for x, y in ((bank_x, bank_y), (query_x, query_y))
        ]

    single = KNNModule(micro_vit(seed=1, depth=1), num_classes=3, ks=[1, 3])
    _trainer().validate(single, dataloaders=loaders(), verbose=False)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    module = KNNModule(micro_vit(seed=1, depth=1), num_classes=3, ks=[1, 3])
    out = trainer.validate(module, dataloaders=loaders(), verbose=False)[0]  # logged by rank 0
    assert {k: pytest.approx(v) for k, v in single.metrics.items()} == {k: out[k] for k in single.metrics}
    assert 0 < single.metrics["knn/top1_k3"] < 100
