"""SegmentationEvaluator / SegmentationHeadModule: metrics, features, learning, CLI end to end, config, bad input."""

from __future__ import annotations

import importlib
import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import cpu_trainer_kwargs as trainer_kwargs
from conftest import micro_vit
from PIL import Image
from test_seg_data import save_palette, write_voc
from test_validate_cli import QUIET, fit_checkpoint, print_config  # noqa: F401 - fixture
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix, MulticlassJaccardIndex

from dora_lightning.cli import main
from dora_lightning.evaluation.contract import Evaluator, EvaluatorSettingError
from dora_lightning.evaluation.synthetic import make_ade20k_fixture, make_voc_fixture
from dora_lightning.models.backbone import forward_features
from evaluators.segmentation.evaluator import (
    SegmentationEvaluator,
    SegmentationHeadModule,
    patch_features,
    segmentation_scores,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny convolutions run faster on one thread than on two cores shared with other jobs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def voc_fixture(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The generated VOC 2012 fixture: 30 train / 10 val images of 4 shape classes on video frames."""
    return make_voc_fixture(tmp_path_factory.mktemp("voc"))


class ColourBackbone(nn.Module):
    """Stands in for a ViT: the 'patch tokens' are the mean colours of ``patch`` x ``patch`` pixel blocks."""

    embed_dim = 3

    def __init__(self, patch: int = 2) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.Identity()])
        self.patch_embed = SimpleNamespace(patch_size=(patch, patch))
        self.patch = patch

    def forward_intermediates(self, images: Tensor, **kwargs: Any) -> list[Tensor]:
        return [F.avg_pool2d(images, self.patch)]


def evaluator(data: Path, **kwargs: Any) -> SegmentationEvaluator:
    args: dict[str, Any] = {
        "data_dir": str(data),
        "image_size": 32,
        "batch_size": 8,
        "num_workers": 0,
        "epochs": 2,
    }
    return SegmentationEvaluator(**{**args, **kwargs})


COLOURS = np.array([[20, 20, 20], [220, 30, 30], [30, 220, 30], [30, 30, 220]], dtype=np.uint8)


def write_colour_voc(root: Path, train: int = 24, val: int = 8) -> Path:
    """A VOC folder where the class is the colour: dark background, red/green/blue rectangles, void borders."""
    rng = np.random.default_rng(0)
    write_voc(root, train=train, val=val)  # the layout; images and masks are replaced below
    for split, count in (("t", train), ("v", val)):
        for i in range(count):
            labels = np.zeros((32, 48), dtype=np.uint8)
            for cls in (1, 2, 3):
                top, left = (2 * int(v) for v in rng.integers(0, 10, size=2))
                height, width = (2 * int(v) for v in rng.integers(3, 7, size=2))
                labels[top : top + height, left : left + width] = cls
            pixels = COLOURS[labels].astype(float) + rng.normal(0, 8, (32, 48, 3))
            labels[labels.shape[0] // 2, :] = np.where(labels[labels.shape[0] // 2] > 0, 255, 0)  # some void
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(
                root / "JPEGImages" / f"{split}{i}.jpg"
            )
            save_palette(labels, root / "SegmentationClass" / f"{split}{i}.png")
    return root


# ------------------------------------------------------------------------------------------------ metrics
def test_scores_match_hand_computation_and_torchmetrics() -> None:
    # classes 0..4; 255 ignored; class 3 only predicted (IoU 0, counted); class 4 absent (not counted)
    target = torch.tensor([0, 0, 1, 1, 2, 255, 2, 0, 1])
    preds = torch.tensor([0, 1, 1, 1, 0, 2, 2, 0, 3])
    confmat = MulticlassConfusionMatrix(5, ignore_index=255)
    confmat.update(preds[:4], target[:4])  # two batches accumulate
    confmat.update(preds[4:], target[4:])
    scores = segmentation_scores(confmat.compute())
    # by hand: class 0: TP 2, union 3 + 3 - 2 = 4; class 1: TP 2, union 3 + 3 - 2; class 2: TP 1, union 1 + 2 - 1
    assert scores["iou"][:4] == pytest.approx([0.5, 0.5, 0.5, 0.0]) and math.isnan(scores["iou"][4])
    assert scores["miou"] == pytest.approx(1.5 / 4)  # not 1.5 / 5: the absent class is left out
    assert scores["pixel_acc"] == pytest.approx(5 / 8)  # the 255 pixel is not counted
    assert scores["classes_scored"] == 4 and scores["pixels"] == 8
    jaccard = MulticlassJaccardIndex(5, ignore_index=255, average="macro")(preds, target)
    accuracy = MulticlassAccuracy(5, average="micro", ignore_index=255)(preds, target)
    assert scores["miou"] == pytest.approx(float(jaccard)) and scores["pixel_acc"] == pytest.approx(
        float(accuracy)
    )


def test_scores_without_labelled_pixels_are_nan() -> None:
    scores = segmentation_scores(torch.zeros(3, 3, dtype=torch.long))
    assert math.isnan(scores["miou"]) and math.isnan(scores["pixel_acc"]) and scores["classes_scored"] == 0


# ------------------------------------------------------------------------------------------------ features / module
def test_patch_features_are_the_final_normed_patch_tokens() -> None:
    vit = micro_vit(depth=3).eval()
    images = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        last = patch_features(vit, images, 1)
        two = patch_features(vit, images, 2)
        _, tokens = forward_features(vit, images)
    assert last.shape == (2, 48, 4, 6) and two.shape == (2, 96, 4, 6)
    torch.testing.assert_close(last, tokens.reshape(2, 4, 6, 48).permute(0, 3, 1, 2))  # row-major patch grid
    torch.testing.assert_close(two[:, 48:], last)  # the last block comes last
    assert not torch.allclose(two[:, :48], last)
    with pytest.raises(ValueError, match=r"n_last_blocks must be in \[1, 3\]"):
        patch_features(vit, images, 4)


def test_module_head_init_and_frozen_backbone() -> None:
    vit = micro_vit()
    module = SegmentationHeadModule(vit, 21, n_last_blocks=2, seed=0)
    module.train()
    assert not vit.training and module.head.training and all(not p.requires_grad for p in vit.parameters())
    assert module.head.weight.shape == (21, 96, 1, 1) and torch.count_nonzero(module.head.bias) == 0
    assert 0.008 < module.head.weight.std().item() < 0.012
    torch.testing.assert_close(module.head.weight, SegmentationHeadModule(vit, 21, 2, seed=0).head.weight)
    logits = module(torch.randn(1, 3, 32, 48))
    assert logits.shape == (1, 21, 4, 6)
    (labels,) = module.predict_labels([torch.randn(3, 32, 48)], [(50, 70)])
    assert labels.shape == (50, 70) and labels.dtype == torch.int64  # upsampled to the original label size


# ------------------------------------------------------------------------------------------------ learning
def test_head_learns_separable_colours(tmp_path: Path) -> None:
    data = write_colour_voc(tmp_path / "voc")
    trained = evaluator(data, epochs=10, lr=0.3, num_classes=4)
    metrics = trained.evaluate(ColourBackbone(), trainer_kwargs(tmp_path))
    assert metrics["segmentation/mIoU"] > 95 and metrics["segmentation/pixel_acc"] > 97
    val_masks = [np.array(Image.open(path)) for path in (data / "SegmentationClass").glob("v*.png")]
    assert trained.scores["pixels"] == sum(
        int((m != 255).sum()) for m in val_masks
    )  # every labelled pixel once
    untrained = evaluator(data, epochs=1, lr=0.0, num_classes=4).evaluate(
        ColourBackbone(), trainer_kwargs(tmp_path)
    )
    assert untrained["segmentation/mIoU"] < 50


def test_head_learns_on_the_generated_voc_fixture(voc_fixture: Path, tmp_path: Path) -> None:
    """Mean colours of 2x2 patches tell most shape classes apart: far above an untrained head."""
    args = {"image_size": 64, "num_classes": 5, "lr": 0.05}
    trained = evaluator(voc_fixture, epochs=15, **args).evaluate(ColourBackbone(), trainer_kwargs(tmp_path))
    untrained = evaluator(voc_fixture, epochs=1, **{**args, "lr": 0.0}).evaluate(
        ColourBackbone(), trainer_kwargs(tmp_path)
    )
    assert (
        trained["segmentation/mIoU"] > 40
        and trained["segmentation/mIoU"] > 3 * untrained["segmentation/mIoU"]
    )
    assert trained["segmentation/pixel_acc"] > 85


# ------------------------------------------------------------------------------------------------ end to end
def test_dora_validate_segmentation_end_to_end(fit_checkpoint, voc_fixture, tmp_path, capsys):  # noqa: F811
    main(
        [
            "validate",
            "--evaluator",
            "segmentation",
            "--ckpt_path",
            str(fit_checkpoint),
            "--evaluator.data_dir",
            str(voc_fixture),
            "--evaluator.image_size",
            "32",
            "--evaluator.epochs",
            "1",
            "--evaluator.num_workers=0",
            *QUIET,
            f"--trainer.default_root_dir={tmp_path}",
        ]
    )
    results = tmp_path / "eval" / "segmentation" / "results_segmentation.json"
    data = json.loads(results.read_text())
    assert list(data["metrics"]) == ["segmentation/mIoU", "segmentation/pixel_acc"]
    for value in data["metrics"].values():
        assert math.isfinite(value) and 0 <= value <= 100
    protocol = data["protocol"]
    assert protocol["layout"] == "voc" and protocol["num_classes"] == 21 and protocol["image_size"] == 32
    assert (protocol["train_images"], protocol["val_images"], protocol["patch_size"]) == (30, 10, 8)
    per_class = protocol["per_class_iou"]
    assert len(per_class) == 21 and per_class["background"] is not None
    assert "not the UperNet fine-tuning" in protocol["protocol"]
    assert data["backbone"]["kind"] == "lightning" and data["backbone"]["embed_dim"] == 48
    assert data["command"].startswith("dora validate --evaluator segmentation")
    assert "segmentation/mIoU" in capsys.readouterr().out


def test_ade20k_layout_end_to_end_restores_the_backbone(tmp_path: Path) -> None:
    root = make_ade20k_fixture(tmp_path / "ade", images=12, size=(48, 64), classes=3)
    vit = micro_vit()
    vit.train()
    before = {k: v.clone() for k, v in vit.state_dict().items()}
    ev = evaluator(root, n_last_blocks=2, optimizer="sgd", lr=0.01)
    metrics = ev.evaluate(vit, trainer_kwargs(tmp_path))
    assert all(math.isfinite(v) for v in metrics.values())
    protocol = ev.protocol()
    assert protocol["layout"] == "ade20k" and protocol["num_classes"] == 150 and protocol["val_images"] == 3
    assert (
        len(protocol["per_class_iou"]) == 150 and protocol["per_class_iou"]["0"] is not None
    )  # shape class 1
    assert protocol["optimizer_detail"].startswith("SGD(lr=0.01, momentum=0.9")
    assert all(torch.equal(before[k], v) for k, v in vit.state_dict().items())
    assert vit.training and all(p.requires_grad for p in vit.parameters())


DDP_SCRIPT = """
import json, os, sys
import torch
from dora_lightning.models.backbone import build_vit
from evaluators.segmentation.evaluator import SegmentationEvaluator

devices, data, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
torch.manual_seed(0)
vit = build_vit("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=3)
ev = SegmentationEvaluator(data, image_size=32, batch_size=2, num_workers=0, epochs=1, lr=0.0)
kwargs = dict(accelerator="cpu", devices=devices, logger=False, enable_progress_bar=False, default_root_dir=out)
metrics = ev.evaluate(vit, {**kwargs, **({"strategy": "ddp"} if devices > 1 else {})})
rank = os.environ.get("LOCAL_RANK", "0")
with open(f"{out}/result_{rank}.json", "w") as fh:
    json.dump({**metrics, "pixels": ev.scores["pixels"]}, fh)
"""


@pytest.mark.slow
def test_ddp_scores_every_validation_image_once(tmp_path: Path) -> None:
    """Two CPU DDP processes (5 validation images: uneven shards) report exactly the single process's scores: the
    confusion matrices are summed over processes, and no image is repeated to even out the shards. lr 0 keeps the
    head identical in both runs."""
    data = make_voc_fixture(tmp_path / "voc", images=22, size=(48, 64))
    script = tmp_path / "ddp_eval.py"
    script.write_text(DDP_SCRIPT)
    results = {}
    for devices in (1, 2):
        (tmp_path / f"out{devices}").mkdir()
        run = subprocess.run(
            [sys.executable, str(script), str(devices), str(data), str(tmp_path / f"out{devices}")],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert run.returncode == 0, run.stderr[-3000:]
        files = sorted((tmp_path / f"out{devices}").glob("result_*.json"))
        assert len(files) == devices
        results[devices] = [json.loads(path.read_text()) for path in files]
    (single,) = results[1]
    assert results[2] == [single, single]
    val_masks = [np.array(Image.open(p)) for p in data.glob("SegmentationClass/*.png")]
    assert single["pixels"] < sum(int((m != 255).sum()) for m in val_masks)  # val only, not train + val


# ------------------------------------------------------------------------------------------------ configuration
def test_bundled_config_builds_the_evaluator(capsys, monkeypatch) -> None:
    config = yaml.safe_load((REPO / "configs" / "eval" / "segmentation.yaml").read_text())
    section = config["evaluator"]
    module, _, name = section["class_path"].rpartition(".")
    assert getattr(importlib.import_module(module), name) is SegmentationEvaluator
    ev = SegmentationEvaluator(**section["init_args"])  # every key is an argument
    assert ev.image_size == 512 and ev.n_last_blocks == 1 and ev.crop_scale == (0.25, 1.0)
    monkeypatch.chdir(REPO)
    parsed = print_config(
        ["--config", "configs/eval/segmentation.yaml", "--evaluator.dataset", "ade20k"], capsys
    )
    assert parsed["evaluator"]["init_args"]["dataset"] == "ade20k"
    assert parsed["evaluator"]["init_args"]["crop_scale"] == [0.25, 1.0]


def test_evaluator_help_lists_its_options(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["validate", "--evaluator.help", "segmentation"])
    out = capsys.readouterr().out
    for option in (
        "--evaluator.dataset",
        "--evaluator.num_classes",
        "--evaluator.n_last_blocks",
        "--evaluator.lr",
    ):
        assert option in out


def test_evaluator_arguments_and_errors(voc_fixture: Path, tmp_path: Path) -> None:
    ev = evaluator(voc_fixture, output_dir=str(tmp_path / "out"))
    assert isinstance(ev, Evaluator) and SegmentationEvaluator.name == "segmentation"
    with pytest.warns(UserWarning, match="max_epochs=7 is replaced by the segmentation evaluator's epochs=2"):
        kwargs = ev.trainer_kwargs({"max_epochs": 7, "enable_checkpointing": None})
    assert kwargs["max_epochs"] == 2 and kwargs["num_sanity_val_steps"] == 0
    assert kwargs["enable_checkpointing"] is False and kwargs["default_root_dir"] == str(tmp_path / "out")
    for bad, match in (
        ({"dataset": "coco"}, "dataset must be 'auto', 'voc' or 'ade20k'"),
        ({"num_classes": 1}, "num_classes must be in 2..255"),
        ({"n_last_blocks": 0}, "n_last_blocks must be >= 1"),
        ({"epochs": 0}, "epochs must be >= 1"),
        ({"optimizer": "lamb"}, "optimizer must be 'adamw' or 'sgd'"),
        ({"lr": -1.0}, "lr and weight_decay must be >= 0"),
        ({"crop_scale": (0.0, 1.0)}, "crop_scale must be"),
    ):
        with pytest.raises(ValueError, match=match):
            evaluator(voc_fixture, **bad)
    for bad, match in (
        (
            {"n_last_blocks": 3},
            r"n_last_blocks=3 exceeds the depth of the checkpoint's backbone \(2 blocks\)",
        ),
        ({"image_size": 36}, "image_size 36 is not a multiple of the backbone's patch size 8"),
        ({"data_dir": str(tmp_path / "missing")}, "does not exist"),
    ):
        with pytest.raises(ValueError, match=match):
            evaluator(voc_fixture, **bad).evaluate(micro_vit(), trainer_kwargs(tmp_path))
    # a Lightning limit that cuts the training or validation images is refused before training (the results file
    # records every image; limit_val_batches 0 used to train every epoch and then fail with "no validation results")
    for limit, match in (
        (
            {"limit_val_batches": 0},
            r"--trainer.limit_val_batches 0 would run 0 of the \d+ batches .* validation images",
        ),
        (
            {"limit_train_batches": 1},
            r"--trainer.limit_train_batches 1 would run 1 of the \d+ batches .* training images",
        ),
    ):
        with pytest.raises(EvaluatorSettingError, match=match):
            evaluator(voc_fixture, epochs=1).evaluate(micro_vit(), trainer_kwargs(tmp_path, **limit))
    with pytest.raises(ValueError, match="cannot run under a spawned/forked strategy"):
        evaluator(voc_fixture).evaluate(
            micro_vit(), trainer_kwargs(tmp_path, devices=2, strategy="ddp_spawn")
        )


@pytest.mark.parametrize("strategy", ["ddp_spawn", "ddp_fork"])
def test_a_spawned_strategy_on_one_device_is_refused(
    strategy: str, voc_fixture: Path, tmp_path: Path
) -> None:
    """As for several devices: one spawned worker process would keep the results (it crashed pickling the metrics)."""
    with pytest.raises(
        EvaluatorSettingError, match="the segmentation evaluator cannot run under a spawned/forked strategy"
    ):
        evaluator(voc_fixture).evaluate(micro_vit(), trainer_kwargs(tmp_path, devices=1, strategy=strategy))


@pytest.mark.slow
def test_bench_seg_smoke(tmp_path: Path) -> None:
    """benchmarks/bench_seg.py runs both cases at a tiny size and reports every field (speed is not asserted)."""
    out = tmp_path / "bench_seg.json"
    command = [
        sys.executable,
        "benchmarks/bench_seg.py",
        "--model",
        "vit_tiny_patch16_224",
        "--image-size",
        "32",
    ]
    command += ["--batches", "1", "--warmup", "0", "--quiet-wait", "0", "--out", str(out)]
    subprocess.run(command, cwd=REPO, check=True, capture_output=True, timeout=300)
    report = json.loads(out.read_text())
    assert [r["case"] for r in report["results"]] == ["eval", "train"]
    for row in report["results"]:
        assert row["images_per_s"] > 0 and row["peak_rss_gb"] >= row["rss_after_build_gb"] > 0
        assert "other_cpu_cores_during" in row
