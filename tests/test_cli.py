"""The `dora` command: subcommands, --print_config, a tiny end-to-end fit, and config errors that name the key."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO

from dora_lightning.cli import main

MICRO_ARGS = [
    "--model.backbone=vit_tiny_patch16_224",
    "--model.img_size=32",
    "--model.patch_size=8",
    "--model.depth=2",
    "--model.embed_dim=48",
    "--model.num_heads=3",
    "--model.out_dim=128",
    "--model.head_hidden_dim=64",
    "--model.head_bottleneck_dim=32",
    "--model.warmup_epochs=1",
    "--data.clip_length=2",
    "--data.frame_stride=10",
    "--data.decode_short_side=48",
    "--data.batch_size=2",
    "--data.num_workers=0",
    "--data.transform.init_args.global_size=32",
    "--data.transform.init_args.local_size=16",
    "--data.transform.init_args.num_local_crops=2",
    "--data.transform.init_args.pre_crop_size=48",
    "--trainer.accelerator=cpu",
    "--trainer.enable_progress_bar=false",
]


def test_console_script_lists_subcommands():
    dora = shutil.which("dora", path=str(Path(sys.executable).parent))
    assert dora is not None, "the dora console script is not installed (run make install)"
    out = subprocess.run([dora, "--help"], capture_output=True, text=True, check=True).stdout
    for sub in ("fit", "validate", "visualize", "compare", "export"):
        assert sub in out


def test_console_fit_lets_lightning_read_the_command_line():
    """From the console script, `dora fit` hands LightningCLI the command line (no "args parameter" warning)."""
    dora = shutil.which("dora", path=str(Path(sys.executable).parent))
    assert dora is not None
    run = subprocess.run(
        [dora, "fit", "--config", "configs/demo.yaml", "--print_config"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "model:" in run.stdout and "args parameter is intended" not in run.stderr


def test_print_config_resolves_the_demo_config(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", "configs/demo.yaml", "--print_config"])
    assert exit_info.value.code in (0, None)
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["model"]["backbone"] == "vit_tiny_patch16_224"
    assert config["data"]["batch_size"] == 8
    assert "batch_size" not in config["model"], "model.batch_size should be linked from data.batch_size"
    assert config["data"]["transform"]["init_args"]["global_size"] == 64


@pytest.mark.parametrize("evaluator", ["linear", "{class_path: linear, init_args: {epochs: 3}}"])
def test_a_fit_config_may_name_eval_durings_evaluator_by_its_short_name(
    evaluator, tmp_path, capsys, monkeypatch
):
    monkeypatch.chdir(REPO)
    overlay = tmp_path / "eval.yaml"
    overlay.write_text(f"eval_during:\n  evaluator: {evaluator}\n  every_n_epochs: 2\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", "configs/demo.yaml", "--config", str(overlay), "--print_config"])
    assert exit_info.value.code in (0, None)
    section = yaml.safe_load(capsys.readouterr().out)["eval_during"]
    assert section["evaluator"]["class_path"] == "evaluators.linear.evaluator.LinearProbeEvaluator"
    assert section["every_n_epochs"] == 2
    assert section["evaluator"]["init_args"]["epochs"] == (3 if "epochs" in evaluator else 100)


@pytest.mark.parametrize(
    "configs",
    [
        ["demo.yaml"],
        ["wt.yaml"],
        ["wt.yaml", "wt_all.yaml"],
        ["wt.yaml", "dino.yaml"],
        ["demo.yaml", "dino.yaml"],
    ],
)
def test_shipped_configs_parse(configs, capsys, monkeypatch):
    """Every shipped config, and the overlays on their base: configs/dino.yaml switches the method, the global
    crops and the augmentation together; configs/wt_all.yaml changes only the videos and the run folder."""
    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *(a for c in configs for a in ("--config", f"configs/{c}")), "--print_config"])
    assert exit_info.value.code in (0, None)
    config = yaml.safe_load(capsys.readouterr().out)
    transform = config["data"]["transform"]["init_args"]
    dino = "dino.yaml" in configs
    assert config["model"]["method"] == ("dino" if dino else "dora")
    assert transform["num_global_crops"] == (2 if dino else 1)
    assert transform["recipe"] == ("dino" if dino else "dora")
    if "wt_all.yaml" in configs:
        assert (
            config["data"]["paths"] == "data/WalkingTours"
            and config["trainer"]["default_root_dir"] == "runs/wt_all"
        )


@pytest.mark.parametrize(("method", "crops"), [("dino", 1), ("dora", 2)])
def test_method_and_global_crops_disagreeing_is_one_line(method, crops, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    args = ["fit", "--config", "configs/demo.yaml", f"--model.method={method}"]
    with pytest.raises(SystemExit) as exit_info:
        main([*args, f"--data.transform.init_args.num_global_crops={crops}"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(
        f"dora fit: error: model.method={method} needs data.transform.init_args.num_global_crops"
    )
    assert len(err.splitlines()) == 1


def test_wrong_config_key_names_it(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  num_objcts: 3\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", "configs/demo.yaml", "--config", str(bad), "--print_config"])
    assert exit_info.value.code == 2
    assert "num_objcts" in capsys.readouterr().err


def test_fit_end_to_end_writes_a_resumable_checkpoint(tmp_path):
    root = tmp_path / "run"
    main(
        [
            "fit",
            *MICRO_ARGS,
            f"--data.paths={REPO / 'assets/video/vtest.mp4'}",
            "--trainer.max_steps=2",
            f"--trainer.default_root_dir={root}",
        ]
    )
    checkpoints = list(root.rglob("*.ckpt"))
    assert checkpoints, "fit wrote no checkpoint"
    state = torch.load(checkpoints[0], map_location="cpu", weights_only=False)
    assert state["dora"]["kind"] == "dora-lightning/pretrain"
    assert state["VideoClipDataModule"]["batches_done"] == 2
    assert any(key.startswith("teacher.backbone.") for key in state["state_dict"])
    assert list(root.rglob("config.yaml")), "the resolved config was not saved next to the run"
