"""Tests for the learning comparison (dora_lightning.compare, `make demo`) and the collapse checks."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from dora_lightning.collapse import (
    effective_rank,
    feature_report,
    last_logged_scalar,
    logged_scalars,
    uniform_entropy,
)
from dora_lightning.compare import format_summary, main, method_config, summarise

REPO = Path(__file__).resolve().parents[1]


def test_method_config_changes_only_what_the_comparison_needs(tmp_path):
    base = yaml.safe_load((REPO / "configs/demo.yaml").read_text())
    dino = method_config(base, "dino", 3, tmp_path / "run", max_epochs=5)
    dora = method_config(base, "dora", 3, tmp_path / "run", max_epochs=None)
    assert (
        base["model"]["method"] == "dora" and base["trainer"]["default_root_dir"] == "runs/demo"
    )  # untouched
    assert dino["model"]["method"] == "dino" and dora["model"]["method"] == "dora"
    assert dino["data"]["transform"]["init_args"]["num_global_crops"] == 2
    assert dora["data"]["transform"]["init_args"]["num_global_crops"] == 1
    # DINO trains with DINO's augmentation, DoRA with the base config's
    assert dino["data"]["transform"]["init_args"]["recipe"] == "dino"
    assert dora["data"]["transform"]["init_args"] == {
        **base["data"]["transform"]["init_args"],
        "num_global_crops": 1,
    }
    assert dino["seed_everything"] == dino["data"]["seed"] == 3
    assert (
        dino["trainer"]["max_epochs"] == 5 and dora["trainer"]["max_epochs"] == base["trainer"]["max_epochs"]
    )
    (checkpoint,) = dino["trainer"]["callbacks"]
    # the run folder is the root: its checkpoints go to run/checkpoints (runs.use_run_folder), no dirpath needed
    assert (
        dino["trainer"]["default_root_dir"] == str(tmp_path / "run")
        and "dirpath" not in checkpoint["init_args"]
    )
    # everything else (model size, schedule, crops) is the base config's
    for key in ("backbone", "depth", "base_lr", "out_dim"):
        assert dino["model"][key] == dora["model"][key] == base["model"][key]
    assert (
        dino["data"]["transform"]["init_args"]["local_size"]
        == base["data"]["transform"]["init_args"]["local_size"]
    )
    with pytest.raises(ValueError, match="method must be"):
        method_config(base, "random", 0, tmp_path, None)


def test_summary_is_mean_and_sample_std_over_seeds():
    rows = [
        {"method": "dora", "seed": 0, "k-NN top-1 (k=20)": 50.0, "feature rank": 10.0},
        {"method": "dora", "seed": 1, "k-NN top-1 (k=20)": 54.0, "feature rank": 12.0},
        {"method": "random", "seed": 0, "k-NN top-1 (k=20)": 40.0, "teacher entropy": None},
    ]
    summary = summarise(rows)
    mean, std, n = summary["dora"]["k-NN top-1 (k=20)"]
    assert (mean, n) == (52.0, 2) and std == pytest.approx(math.sqrt(8.0))
    assert summary["random"]["k-NN top-1 (k=20)"] == (40.0, 0.0, 1)
    assert "teacher entropy" not in summary["random"]  # not logged: no value, shown as n/a
    table = format_summary(summary)
    assert "| DoRA | 52.00 ± 2.83 (n=2) | 11.00 ± 1.41 (n=2) |" in table
    assert "| random init | 40.00 | n/a |" in table


def test_effective_rank_and_collapse_report():
    generator = torch.Generator().manual_seed(0)
    spread = torch.randn(400, 32, generator=generator)
    assert effective_rank(spread) > 25
    line = torch.randn(400, 1, generator=generator) * torch.randn(1, 32, generator=generator)
    assert effective_rank(line) == pytest.approx(1.0, abs=1e-3)
    with pytest.raises(ValueError, match="N >= 2"):
        effective_rank(torch.ones(1, 4))

    class Constant(torch.nn.Module):  # a collapsed "backbone": the same CLS feature for every image
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(8))

    images = [(torch.rand(5, 3, 8, 8), torch.zeros(5)) for _ in range(3)]
    import dora_lightning.models.backbone as backbone_module

    original = backbone_module.forward_features
    backbone_module.forward_features = lambda model, x: (model.weight.expand(x.shape[0], 8), None)
    try:
        report = feature_report(Constant(), images)  # type: ignore[arg-type]
    finally:
        backbone_module.forward_features = original
    assert report["images"] == 15 and report["feature_std"] == pytest.approx(0.0, abs=1e-6)
    assert report["mean_cosine"] == pytest.approx(1.0, abs=1e-5)
    assert uniform_entropy(4096) == pytest.approx(math.log(4096))


def test_last_logged_scalar_reads_tensorboard(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path / "version_0"))
    for step, value in [(0, 3.0), (5, 2.5), (10, 2.0)]:
        writer.add_scalar("train/teacher_entropy", value, step)
    writer.close()
    assert last_logged_scalar(tmp_path, "train/teacher_entropy") == (10, 2.0)
    assert last_logged_scalar(tmp_path, "train/other") is None
    assert last_logged_scalar(tmp_path / "missing", "train/teacher_entropy") is None
    assert logged_scalars(tmp_path, "train/teacher_entropy") == [(0, 3.0), (5, 2.5), (10, 2.0)]
    resumed = SummaryWriter(str(tmp_path / "version_0"), purge_step=5)  # a resumed run writes step 5 again
    resumed.add_scalar("train/teacher_entropy", 2.25, 5)
    resumed.close()
    assert logged_scalars(tmp_path, "train/teacher_entropy")[1] == (5, 2.25)


@pytest.mark.slow
def test_demo_pipeline_at_a_tiny_budget(tmp_path, monkeypatch):
    """The whole comparison (random init, DINO, DoRA; k-NN, linear probe, DAVIS) runs end to end, writes its table and
    reuses a finished pretraining when rerun."""
    monkeypatch.chdir(REPO)
    out = tmp_path / "demo"
    report = main(
        ["--output_dir", str(out), "--image_size", "32", "--linear_epochs", "1", "--davis_short_side", "32",
         "--fit_arg=--trainer.max_steps=2", "--fit_arg=--trainer.enable_progress_bar=false",
         "--eval_arg=--trainer.enable_progress_bar=false"]
    )  # fmt: skip
    assert [(r["method"], r["seed"]) for r in report["rows"]] == [("random", 0), ("dino", 0), ("dora", 0)]
    for row in report["rows"]:
        assert 0.0 < row["k-NN top-1 (k=20)"] <= 100.0
        assert 0.0 <= row["linear top-1 (best)"] <= 100.0 and 0.0 <= row["DAVIS J&F"] <= 100.0
        assert row["feature rank"] > 1.0
    table = (out / "comparison.md").read_text()
    assert all(f"| {name} |" in table for name in ("random init", "DINO", "DoRA"))
    assert json.loads((out / "comparison.json").read_text())["rows"] == report["rows"]
    # random init = the config's networks before the first step: the teacher is still the student
    state = torch.load(out / "seed0/random/random_init.ckpt", weights_only=False)["state_dict"]
    key = "backbone.blocks.0.attn.qkv.weight"
    assert torch.equal(state[f"teacher.{key}"], state[f"student.{key}"])
    trained = torch.load(out / "seed0/dora/checkpoints/last.ckpt", weights_only=False)["state_dict"]
    assert not torch.equal(trained[f"student.{key}"], state[f"student.{key}"])
    assert (out / "seed0/dino/fit_config.yaml").is_file() and (
        out / "seed0/dora/eval/knn/results_knn.json"
    ).is_file()


@pytest.mark.slow
def test_curve_is_the_knn_after_each_epoch(tmp_path, monkeypatch):
    """`--curve`: k-NN during pretraining after each epoch, in the row and the table; its last point is what
    `dora validate` measures on the last checkpoint."""
    monkeypatch.chdir(REPO)
    out = tmp_path / "curve"
    report = main(
        ["--output_dir", str(out), "--methods", "dora", "--evaluators", "knn", "--image_size", "32", "--curve",
         "--max_epochs", "2", "--fit_arg=--trainer.limit_train_batches=2",
         "--fit_arg=--trainer.enable_progress_bar=false", "--eval_arg=--trainer.enable_progress_bar=false"]
    )  # fmt: skip
    (row,) = report["rows"]
    curve = row["k-NN top-1 (k=20) after each epoch"]
    assert [step for step, _ in curve] == [2, 4]
    assert curve[-1][1] == row["k-NN top-1 (k=20)"]
    assert (
        f"- DoRA seed 0: {curve[0][1]:.2f}, {curve[1][1]:.2f} (steps 2, 4)"
        in (out / "comparison.md").read_text()
    )


def _printed_transform(configs: list[str], capsys, monkeypatch) -> dict:
    """The transform arguments `dora fit --config ... --print_config` resolves (overlays merged in order)."""
    from dora_lightning.cli import main

    monkeypatch.chdir(REPO)
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["fit", *(a for c in configs for a in ("--config", c)), "--print_config"])
    return yaml.safe_load(capsys.readouterr().out)["data"]["transform"]["init_args"]


def test_dino_gets_dinos_augmentation(capsys, monkeypatch):
    """method_config's DINO transform and `--config configs/wt.yaml --config configs/dino.yaml`'s are DINO's recipe,
    whatever DoRA-side values of the recipe's arguments the base config has; configs/wt.yaml's is DoRA's."""
    from dora_lightning.data.augment.multicrop import ClipMultiCrop

    base = yaml.safe_load((REPO / "configs/demo.yaml").read_text())
    base["data"]["transform"]["init_args"].update(global_blur_prob=0.1, local_flip_prob=0.0)
    dino_args = method_config(base, "dino", 0, Path("run"), None)["data"]["transform"]["init_args"]
    dora_args = method_config(base, "dora", 0, Path("run"), None)["data"]["transform"]["init_args"]
    wt_dino = _printed_transform(["configs/wt.yaml", "configs/dino.yaml"], capsys, monkeypatch)
    wt_dora = _printed_transform(["configs/wt.yaml"], capsys, monkeypatch)
    for args in (dino_args, wt_dino):
        t = ClipMultiCrop(**args)
        assert (t.num_global_crops, t.global_blur_prob, t.global_solarize_prob) == (2, (1.0, 0.1), (0.0, 0.2))
        assert (t.local_flip_prob, t.local_blur_prob) == (0.5, 0.5)
    for args in (dora_args, wt_dora):
        t = ClipMultiCrop(**args)
        assert (t.num_global_crops, t.global_blur_prob, t.global_solarize_prob) == (1, (0.1,), (0.0,))
        assert t.local_flip_prob == 0.0


def test_a_missing_config_is_one_line_with_exit_status_2(tmp_path, capsys):
    """It exited 1 with `error: ...` (no `dora compare:` in front), unlike every other user error."""
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", str(tmp_path / "nope.yaml"), "--output_dir", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == (
        f"dora compare: error: --config '{tmp_path / 'nope.yaml'}' does not exist; give a `dora fit` YAML config\n"
    )
    assert not (tmp_path / "out").exists()
