"""LinearProbeEvaluator / LinearProbeModule: learns a separable problem, lr grid, best vs final, schedule, features."""

from __future__ import annotations

import importlib
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import yaml
from conftest import cpu_trainer_kwargs as trainer_kwargs
from conftest import micro_vit
from PIL import Image

from dora_lightning.evaluation.contract import EvaluationDataError, Evaluator, EvaluatorSettingError
from dora_lightning.evaluation.samplers import unrepeated_sampler
from dora_lightning.models.backbone import build_vit, forward_features, last_n_block_cls
from evaluators.linear.evaluator import LinearProbeEvaluator, LinearProbeModule, probe_features, summarize

REPO = Path(__file__).resolve().parents[1]
# the class is the colour; brightness and pixel noise vary, so train and val images differ
COLOURS = {"blue": (30, 60, 200), "green": (40, 180, 60), "red": (200, 40, 40), "yellow": (220, 210, 40)}
EPOCHS = 3
GOOD_LR = 0.3  # base lr; the SGD lr is 0.3 * 16 / 256


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matmuls run ~5x faster on one thread than on two cores shared with other jobs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def colour_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("colours")
    rng = np.random.default_rng(0)
    for split, count in (("train", 12), ("val", 6)):
        for name, rgb in COLOURS.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = np.array(rgb)[None, None] * rng.uniform(0.6, 1.2) + rng.normal(0, 25, (32, 32, 3))
                Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"{i}.png")
    return root


def evaluator(data: Path, **kwargs: Any) -> LinearProbeEvaluator:
    args: dict[str, Any] = {
        "data_dir": str(data),
        "image_size": 32,
        "batch_size": 16,
        "num_workers": 0,
        "n_last_blocks": 2,
        "epochs": EPOCHS,
        "lr": GOOD_LR,
    }
    args.update(kwargs)
    return LinearProbeEvaluator(**args)


class RecordLR(pl.Callback):
    def __init__(self) -> None:
        self.lrs: list[list[float]] = []

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        self.lrs.append([g["lr"] for g in trainer.optimizers[0].param_groups])


class Sabotage(pl.Callback):
    """Negate the heads' logits just before the last validation: the final epoch becomes the worst one."""

    def on_validation_epoch_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if trainer.current_epoch == trainer.max_epochs - 1:
            with torch.no_grad():
                for head in module.heads:
                    head.weight.neg_()
                    head.bias.neg_()


# ------------------------------------------------------------------------------------------------ end to end
def test_probe_learns_separable_classes_with_frozen_backbone(colour_data: Path, tmp_path: Path) -> None:
    vit = micro_vit()
    vit.train()  # the caller's mode and requires_grad flags come back after the probe
    before = {k: v.clone() for k, v in vit.state_dict().items()}
    record = RecordLR()
    ev = evaluator(colour_data)
    metrics = ev.evaluate(vit, trainer_kwargs(tmp_path, callbacks=[record], num_sanity_val_steps=1))
    assert metrics["linear/top1_best"] > 90 and metrics["linear/top1_final"] > 90
    assert metrics["linear/top5_final"] == 100.0  # percent; 4 classes: top-5 is top-4
    assert metrics["linear/top1_best_lr"] == GOOD_LR and metrics["linear/top1_final_lr"] == GOOD_LR
    assert metrics["linear/epochs_validated"] == EPOCHS
    assert not any("/lr_" in k for k in metrics)  # no grid, no per-lr metrics
    # validated after every epoch (not the sanity check), numbered from 1
    assert [h["epoch"] for h in ev.history] == list(range(1, EPOCHS + 1))
    # frozen: weights unchanged, and the caller's state restored
    assert all(torch.equal(before[k], v) for k, v in vit.state_dict().items())
    assert vit.training and all(p.requires_grad for p in vit.parameters())
    # lr = base * batch / 256, cosine to 0 over all steps (3 steps per epoch)
    effective = GOOD_LR * 16 / 256
    assert ev.effective_lrs == [pytest.approx(effective)]
    total = EPOCHS * 3
    assert len(record.lrs) == total
    for step, (lr,) in enumerate(record.lrs):
        assert lr == pytest.approx(effective * 0.5 * (1 + math.cos(math.pi * step / total)))
    protocol = ev.protocol()
    assert (
        protocol["evaluator"] == "linear" and protocol["n_last_blocks"] == 2 and protocol["epochs"] == EPOCHS
    )
    assert protocol["num_classes"] == 4 and protocol["train_images"] == 48 and protocol["val_images"] == 24
    assert protocol["effective_lrs"] == [pytest.approx(effective)]
    assert protocol["val_history"] == ev.history


def test_bundled_config_builds_the_evaluator() -> None:
    config = yaml.safe_load((REPO / "configs" / "eval" / "linear.yaml").read_text())
    section = config["evaluator"]
    module, _, name = section["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    assert cls is LinearProbeEvaluator
    ev = cls(**section["init_args"])  # every key is an argument
    assert ev.data_dir == "assets/fashion_mnist" and ev.image_size == 32 and ev.n_last_blocks == 4
    assert (REPO / ev.data_dir / "train").is_dir()
    assert config["trainer"]["accelerator"] == "cpu"


def test_lr_grid_trains_every_head_and_reports_the_best(colour_data: Path, tmp_path: Path) -> None:
    lrs = [0.0, GOOD_LR, 3.0]
    ev = evaluator(colour_data, lrs=lrs, epochs=2)
    metrics = ev.evaluate(micro_vit(), trainer_kwargs(tmp_path))
    heads = ev.module.heads
    fresh = LinearProbeModule(micro_vit(), 4, lrs=lrs, n_last_blocks=2, seed=0).heads
    assert torch.equal(heads[0].weight, fresh[0].weight)  # lr 0: never moved
    for i in (1, 2):
        assert not torch.equal(heads[i].weight, fresh[i].weight)
    for lr in ("0", "0.3", "3"):
        for name in ("top1_best", "top1_best_epoch", "top5_at_top1_best", "top1_final", "top5_final"):
            assert f"linear/lr_{lr}/{name}" in metrics
    assert metrics["linear/lr_0/top1_best"] <= 50  # an untrained head is near chance (25 %)
    assert metrics["linear/lr_0.3/top1_best"] > 90
    per_lr = {lr: metrics[f"linear/lr_{lr:g}/top1_best"] for lr in lrs}
    best = max(per_lr.values())
    assert metrics["linear/top1_best"] == best
    assert metrics["linear/top1_best_lr"] == next(lr for lr in lrs if per_lr[lr] == best)
    assert metrics["linear/top1_best_lr"] != 0.0


def test_grid_heads_train_independently(colour_data: Path, tmp_path: Path) -> None:
    alone = evaluator(colour_data, lrs=[GOOD_LR], epochs=1)
    alone.evaluate(micro_vit(), trainer_kwargs(tmp_path / "a"))
    grid = evaluator(colour_data, lrs=[GOOD_LR, 3.0], epochs=1)
    grid.evaluate(micro_vit(), trainer_kwargs(tmp_path / "b"))
    torch.testing.assert_close(grid.module.heads[0].weight, alone.module.heads[0].weight)
    assert grid.history[0]["top1"][0] == alone.history[0]["top1"][0]


def test_best_epoch_and_final_epoch_reported_apart(colour_data: Path, tmp_path: Path) -> None:
    ev = evaluator(colour_data)
    metrics = ev.evaluate(micro_vit(), trainer_kwargs(tmp_path, callbacks=[Sabotage()]))
    top1 = [h["top1"][0] for h in ev.history]
    assert top1[-1] < 50 < max(top1)  # the last epoch was sabotaged
    assert metrics["linear/top1_final"] == top1[-1]
    assert metrics["linear/top5_final"] == ev.history[-1]["top5"][0]
    assert metrics["linear/top1_best"] == max(top1) > 90
    assert metrics["linear/top1_best_epoch"] == top1.index(max(top1)) + 1 < EPOCHS
    assert metrics["linear/top5_at_top1_best"] == ev.history[top1.index(max(top1))]["top5"][0]


def test_avgpool_patchtokens_end_to_end(colour_data: Path, tmp_path: Path) -> None:
    ev = evaluator(colour_data, avgpool_patchtokens=True, n_last_blocks=1, epochs=1)
    metrics = ev.evaluate(micro_vit(), trainer_kwargs(tmp_path))
    assert ev.module.heads[0].in_features == 2 * 48
    assert 0.0 <= metrics["linear/top1_final"] <= 100.0


DDP_SCRIPT = """
import json, os, sys
import torch
from dora_lightning.models.backbone import build_vit
from evaluators.linear.evaluator import LinearProbeEvaluator

torch.set_num_threads(1)
devices, data, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
torch.manual_seed(0)
vit = build_vit("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=3)
ev = LinearProbeEvaluator(
    data, image_size=32, batch_size=2, num_workers=0, n_last_blocks=2, epochs=1, lr=0.0, train_augment=False
)
kwargs = dict(
    accelerator="cpu", devices=devices, logger=False, enable_progress_bar=False, enable_model_summary=False,
    default_root_dir=out,
)
metrics = ev.evaluate(vit, {**kwargs, **({"strategy": "ddp"} if devices > 1 else {})})
with open(f"{out}/result_{os.environ.get('LOCAL_RANK', '0')}.json", "w") as fh:
    json.dump({"metrics": metrics, "history": ev.history}, fh)
"""


def write_mixed_folder(root: Path, val_counts: tuple[int, ...] = (3, 2, 2)) -> Path:
    """ImageFolder of noisy images of random colours (not tied to the class, so that an untrained head is right on some
    images and wrong on others): 3 training images per class and ``val_counts`` validation images (7: odd)."""
    rng = np.random.default_rng(0)
    colours = list(COLOURS.values())
    for split, counts in (("train", (3,) * len(val_counts)), ("val", val_counts)):
        for c, count in enumerate(counts):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(count):
                rgb = np.array(colours[int(rng.integers(0, len(colours)))])
                pixels = rgb[None, None] * rng.uniform(0.5, 1.3) + rng.normal(0, 30, (32, 32, 3))
                Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"{i}.png")
    return root


def test_unrepeated_sampler_shares_every_item_once() -> None:
    items = list(range(7))
    assert unrepeated_sampler(items, 0, 1) is None
    shares = [list(unrepeated_sampler(items, rank, 2)) for rank in (0, 1)]
    assert shares == [[0, 2, 4, 6], [1, 3, 5]]
    with pytest.raises(ValueError, match="1 evaluation item"):
        unrepeated_sampler([0], 0, 2)
    with pytest.raises(ValueError, match="rank < world_size"):
        unrepeated_sampler(items, 2, 2)


@pytest.mark.slow
def test_ddp_scores_every_validation_image_once(tmp_path: Path) -> None:
    """Two CPU DDP processes (gloo) on 7 validation images (odd: DistributedSampler would repeat one) count 7 images
    and report exactly the single process's top-1/top-5. lr 0 keeps the seeded heads identical in both runs."""
    data = write_mixed_folder(tmp_path / "data")
    script = tmp_path / "ddp_linear.py"
    script.write_text(DDP_SCRIPT)
    results = {}
    for devices in (1, 2):
        out = tmp_path / f"out{devices}"
        out.mkdir()
        run = subprocess.run(
            [sys.executable, str(script), str(devices), str(data), str(out)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert run.returncode == 0, run.stderr[-3000:]
        files = sorted(out.glob("result_*.json"))
        assert len(files) == devices
        results[devices] = [json.loads(path.read_text()) for path in files]
    (single,) = results[1]
    assert single["history"][-1]["images"] == 7
    assert 0 < single["metrics"]["linear/top1_final"] < 100  # a repeated image would change it
    assert results[2] == [single, single]


# ------------------------------------------------------------------------------------------------ summarize
HISTORY = [
    {"epoch": 1, "top1": [0.50, 0.60], "top5": [0.81, 0.91]},
    {"epoch": 2, "top1": [0.90, 0.70], "top5": [0.82, 0.92]},
    {"epoch": 3, "top1": [0.90, 0.75], "top5": [0.83, 0.93]},
    {"epoch": 4, "top1": [0.80, 0.85], "top5": [0.84, 0.94]},
]


def test_summarize_best_and_final_of_a_grid() -> None:
    m = summarize(HISTORY, [0.01, 0.1], per_lr=True)
    # best: lr 0.01 reaches 0.90 first at epoch 2 (tie with epoch 3 goes to the earlier epoch)
    assert m["linear/top1_best"] == 0.90 and m["linear/top1_best_epoch"] == 2.0
    assert m["linear/top1_best_lr"] == 0.01 and m["linear/top5_at_top1_best"] == 0.82
    # final: at the last epoch lr 0.1 is ahead
    assert (
        m["linear/top1_final"] == 0.85 and m["linear/top5_final"] == 0.94 and m["linear/top1_final_lr"] == 0.1
    )
    assert m["linear/epochs_validated"] == 4.0
    assert m["linear/lr_0.01/top1_final"] == 0.80 and m["linear/lr_0.1/top1_best"] == 0.85
    assert m["linear/lr_0.1/top1_best_epoch"] == 4.0 and m["linear/lr_0.01/top5_final"] == 0.84
    single = summarize(
        [{**h, "top1": h["top1"][1:], "top5": h["top5"][1:]} for h in HISTORY], [0.1], per_lr=False
    )
    assert single["linear/top1_best"] == single["linear/top1_final"] == 0.85
    assert not any("/lr_" in k for k in single)


def test_summarize_ties_go_to_the_earlier_lr() -> None:
    history = [{"epoch": 1, "top1": [0.5, 0.5], "top5": [1.0, 1.0]}]
    m = summarize(history, [0.2, 0.1], per_lr=True)
    assert m["linear/top1_best_lr"] == 0.2 and m["linear/top1_final_lr"] == 0.2
    with pytest.raises(ValueError, match="never validated"):
        summarize([], [0.1], per_lr=False)


# ------------------------------------------------------------------------------------------------ pieces
def test_probe_features_and_frozen_eval_backbone() -> None:
    vit = build_vit(
        "vit_tiny_patch16_224",
        img_size=32,
        patch_size=8,
        depth=3,
        embed_dim=48,
        num_heads=3,
        drop_path_rate=0.5,
    )
    images = torch.randn(2, 3, 32, 32)
    vit.eval()
    with torch.no_grad():
        plain = probe_features(vit, images, 2, avgpool=False)
        pooled = probe_features(vit, images, 2, avgpool=True)
        cls, patches = forward_features(vit, images)
    assert plain.shape == (2, 96) and pooled.shape == (2, 144)
    torch.testing.assert_close(plain, last_n_block_cls(vit, images, 2))
    torch.testing.assert_close(pooled[:, :96], plain)
    torch.testing.assert_close(pooled[:, 48:96], cls)  # the last block's CLS is the final-normed CLS
    torch.testing.assert_close(pooled[:, 96:], patches.mean(dim=1))
    module = LinearProbeModule(vit, 3, lrs=[0.1, 0.2], n_last_blocks=2, avgpool_patchtokens=True)
    module.train()
    assert not vit.training and module.heads.training  # drop path would make features random
    assert all(not p.requires_grad for p in vit.parameters())
    assert [h.in_features for h in module.heads] == [144, 144]
    torch.testing.assert_close(module.features(images), module.features(images))
    for head in module.heads:
        assert torch.count_nonzero(head.bias) == 0 and 0.005 < head.weight.std().item() < 0.02


def test_evaluator_arguments_and_trainer_kwargs(colour_data: Path, tmp_path: Path) -> None:
    ev = evaluator(colour_data, output_dir=str(tmp_path / "out"))
    assert isinstance(ev, Evaluator) and LinearProbeEvaluator.name == "linear"
    with pytest.warns(UserWarning, match="max_epochs=7 is replaced by the linear probe's epochs=3"):
        kwargs = ev.trainer_kwargs({"max_epochs": 7, "accelerator": "cpu"})
    assert kwargs["max_epochs"] == EPOCHS and kwargs["num_sanity_val_steps"] == 0
    assert kwargs["check_val_every_n_epoch"] == 1 and kwargs["enable_checkpointing"] is False
    assert kwargs["default_root_dir"] == str(tmp_path / "out") and kwargs["accelerator"] == "cpu"
    # LightningCLI passes unset Trainer options as None; explicit values win
    cli = ev.trainer_kwargs(
        {"enable_checkpointing": None, "num_sanity_val_steps": None, "default_root_dir": None}
    )
    assert cli["enable_checkpointing"] is False and cli["num_sanity_val_steps"] == 0
    assert cli["default_root_dir"] == str(tmp_path / "out")
    assert ev.trainer_kwargs({"enable_checkpointing": True})["enable_checkpointing"] is True
    for bad, match in (
        ({"lrs": []}, "lrs is an empty list"),
        ({"lrs": [0.1, 0.1]}, "the same lr twice"),
        ({"lr": -1.0}, "learning rates must be >= 0"),
        ({"epochs": 0}, "epochs must be >= 1"),
        ({"n_last_blocks": 0}, "n_last_blocks must be >= 1"),
    ):
        with pytest.raises(ValueError, match=match):
            evaluator(colour_data, **bad)
    with pytest.raises(
        EvaluatorSettingError,
        match=r"n_last_blocks=4 exceeds the depth of the checkpoint's backbone \(2 blocks\)",
    ):
        evaluator(colour_data, n_last_blocks=4).evaluate(micro_vit(), trainer_kwargs(tmp_path))
    with pytest.raises(ValueError, match="cannot run under a spawned/forked strategy"):
        evaluator(colour_data).evaluate(
            micro_vit(), trainer_kwargs(tmp_path, devices=2, strategy="ddp_spawn")
        )
    with pytest.raises(ValueError, match="does not exist"):
        evaluator(tmp_path / "missing").evaluate(micro_vit(), trainer_kwargs(tmp_path))


@pytest.mark.parametrize("strategy", ["ddp_spawn", "ddp_fork"])
def test_a_spawned_strategy_on_one_device_is_refused(
    strategy: str, colour_data: Path, tmp_path: Path
) -> None:
    """Lightning starts a worker process for a spawn/fork strategy also on one device; the probe was let through and
    crashed pickling its metrics (a traceback) instead of the one-line refusal given for several devices."""
    with pytest.raises(
        EvaluatorSettingError, match="the linear probe cannot run under a spawned/forked strategy"
    ):
        evaluator(colour_data).evaluate(micro_vit(), trainer_kwargs(tmp_path, devices=1, strategy=strategy))


def test_a_single_class_is_refused_in_one_line(tmp_path: Path) -> None:
    """One class folder used to end in a traceback from inside the probe; now one line, before any training."""
    root = write_mixed_folder(tmp_path / "one", val_counts=(2,))
    with pytest.raises(EvaluationDataError) as info:
        evaluator(root).evaluate(micro_vit(), trainer_kwargs(tmp_path))
    message = str(info.value)
    assert message.startswith("a linear probe needs at least 2 classes;") and "\n" not in message
    assert f"'{root / 'train'}'" in message and "'class0'" in message


@pytest.mark.parametrize(
    ("limit", "message"),
    [
        (
            {"limit_train_batches": 1},
            "--trainer.limit_train_batches 1 would run 1 of the 3 batches (per process) of the 48 training images",
        ),
        (
            {"limit_val_batches": 0.5},
            "--trainer.limit_val_batches 0.5 would run 1 of the 2 batches (per process) of the 24 validation images",
        ),
        ({"limit_val_batches": 0}, "--trainer.limit_val_batches 0 would run 0 of the 2 batches"),
    ],
)
def test_a_batch_limit_that_cuts_the_data_is_refused_before_training(
    colour_data: Path, tmp_path: Path, limit: dict[str, Any], message: str
) -> None:
    """The results file records every training and validation image; a Lightning limit that cut them trained or
    scored a subset under that record."""
    record = RecordLR()
    with pytest.raises(EvaluatorSettingError) as info:
        evaluator(colour_data).evaluate(micro_vit(), trainer_kwargs(tmp_path, callbacks=[record], **limit))
    assert str(info.value).startswith(message) and "remove the limit" in str(info.value)
    assert record.lrs == []  # refused before the first training step
