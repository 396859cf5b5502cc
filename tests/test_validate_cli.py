"""`dora validate --evaluator ...`: end to end on a `dora fit` checkpoint, config files, plugins and bad input."""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, micro_vit
from test_cli import MICRO_ARGS
from test_evaluators_base import toy_distribution  # noqa: F401 - fixture
from test_knn import write_image_folder

import dora_lightning.cli as cli_module
import dora_lightning.evaluation.runner as runner
from dora_lightning.checkpoints import EXPORT_FORMAT, load_backbone
from dora_lightning.cli import main
from dora_lightning.models.backbone import build_vit
from dora_lightning.module import DoRAModule

FASHION = REPO / "assets" / "fashion_mnist"
QUIET = [
    "--trainer.accelerator=cpu",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]


@pytest.fixture(scope="module")
def fit_checkpoint(tmp_path_factory) -> Path:
    """A checkpoint of a 2-step `dora fit` of the micro model on the bundled video."""
    root = tmp_path_factory.mktemp("fit")
    main(
        [
            "fit",
            *MICRO_ARGS,
            f"--data.paths={REPO / 'assets/video/vtest.mp4'}",
            "--trainer.max_steps=2",
            f"--trainer.default_root_dir={root}",
        ]
    )
    (ckpt,) = root.rglob("*.ckpt")
    return ckpt


@pytest.fixture(scope="module")
def image_root(tmp_path_factory) -> tuple[Path, int]:
    """The bundled Fashion-MNIST subset when present, else 3 classes of solid colours; and the class count."""
    if (FASHION / "train").is_dir() and (FASHION / "val").is_dir():
        return FASHION, len([p for p in (FASHION / "train").iterdir() if p.is_dir()])
    return write_image_folder(tmp_path_factory.mktemp("images")), 3


@pytest.fixture
def exported_teacher(tmp_path) -> Path:
    """A dora-export file holding only a micro teacher backbone (depth 1, 32 px, patch 8)."""
    model = micro_vit(depth=1)
    path = tmp_path / "teacher.pth"
    kwargs = {"img_size": 32, "patch_size": 8, "depth": 1, "embed_dim": 48, "num_heads": 3}
    torch.save(
        {
            "format": EXPORT_FORMAT,
            "version": 1,
            "model_name": "vit_tiny_patch16_224",
            "model_kwargs": kwargs,
            "which": "teacher",
            "state_dict": model.state_dict(),
        },
        path,
    )
    return path


@pytest.fixture
def recorded(monkeypatch) -> list[runner.Evaluation]:
    """The evaluations `dora validate` runs; building the DoRA module (or any LightningCLI) fails the test."""
    evaluations: list[runner.Evaluation] = []
    original = runner.run

    def recording(argv):
        evaluations.append(original(argv))
        return evaluations[-1]

    def refuse(*args, **kwargs):
        raise AssertionError("dora validate must not build the DoRA module or LightningCLI")

    monkeypatch.setattr(runner, "run", recording)
    monkeypatch.setattr(DoRAModule, "__init__", refuse)
    monkeypatch.setattr(cli_module.DoraCLI, "__init__", refuse)
    return evaluations


def knn_args(checkpoint: Path, data_dir: Path, ks: str, batch_size: int) -> list[str]:
    """`dora validate --evaluator knn` of the micro checkpoint at its 32 px, in the main process."""
    return [
        "validate",
        "--evaluator",
        "knn",
        "--ckpt_path",
        str(checkpoint),
        f"--evaluator.ks={ks}",
        "--evaluator.image_size=32",
        f"--evaluator.data_dir={data_dir}",
        "--evaluator.num_workers=0",
        f"--evaluator.batch_size={batch_size}",
    ]


def test_validate_knn_end_to_end(fit_checkpoint, image_root, tmp_path, capsys, recorded):
    data_dir, num_classes = image_root
    args = [
        *knn_args(fit_checkpoint, data_dir, "[1,5,10]", batch_size=128),
        *QUIET,
        f"--trainer.default_root_dir={tmp_path}",
    ]
    main(args)
    out = capsys.readouterr().out
    results = tmp_path / "eval" / "knn" / "results_knn.json"
    assert results.is_file(), out
    data = json.loads(results.read_text())
    names = [f"knn/top{n}_k{k}" for k in (1, 5, 10) for n in (1, 5)]
    assert list(data["metrics"]) == names
    for name in names:  # the printed table shows every metric of the file
        assert f"| {name:<12} | {data['metrics'][name]:5.2f} |" in out
    assert f"results written to {results}" in out
    # a trained-for-2-steps micro ViT still separates the classes far better than chance
    assert data["metrics"]["knn/top1_k5"] > 2 * 100 / num_classes
    assert data["metrics"]["knn/top5_k5"] >= data["metrics"]["knn/top1_k5"]
    assert data["checkpoint"]["sha256"] == hashlib.sha256(fit_checkpoint.read_bytes()).hexdigest()
    assert data["protocol"]["ks"] == [1, 5, 10] and data["protocol"]["image_size"] == 32
    assert data["protocol"]["num_classes"] == num_classes
    assert data["protocol"]["data_path"] == str(Path(data_dir).resolve())
    assert data["backbone"]["kind"] == "lightning" and data["backbone"]["which"] == "teacher"
    assert data["backbone"]["embed_dim"] == 48 and data["backbone"]["img_size"] == 32
    assert data["command"].startswith("dora validate --evaluator knn --ckpt_path")
    assert {"torch", "timm", "lightning", "torchmetrics", "dora-lightning"} <= set(data["versions"])
    assert data["trainer"]["precision"] == "32-true" and data["trainer"]["accelerator"] == "cpu"
    assert data["trainer"]["hardware"].startswith("cpu (") and data["trainer"]["num_nodes"] == 1
    (evaluation,) = recorded
    assert evaluation.metrics == data["metrics"] and evaluation.results_path == results


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["validate", "--ckpt_path=x.ckpt"], "dora validate: error: --evaluator is required"),
        (["test", "--ckpt_path=x.ckpt"], "dora: error: unknown subcommand 'test'"),
        (["predict"], "dora: error: unknown subcommand 'predict'"),
    ],
)
def test_validate_is_the_evaluator_runner_and_test_predict_are_gone(args, message, capsys):
    """Lightning's validate/test/predict of the pretraining module meant nothing: `dora validate` always evaluates
    a checkpoint with an evaluator plugin."""
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_third_party_evaluator_runs_via_the_cli(toy_distribution, exported_teacher, tmp_path, capsys):  # noqa: F811
    main(
        [
            "validate",
            "--evaluator=toy",
            f"--ckpt_path={exported_teacher}",
            "--evaluator.num_images=4",
            "--evaluator.image_size=32",
            *QUIET,
            f"--trainer.default_root_dir={tmp_path}",
        ]
    )
    data = json.loads((tmp_path / "eval" / "toy" / "results_toy.json").read_text())
    backbone, _ = load_backbone(exported_teacher, img_size=32)
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = backbone.forward_features(images)[:, 0].norm(dim=-1).mean().item()
    assert data["metrics"]["toy/cls_norm"] == pytest.approx(expected, rel=1e-5)
    assert data["protocol"]["class_path"] == "toy_eval.ToyEvaluator"
    assert data["protocol"]["num_images"] == 4 and data["protocol"]["image_size"] == 32
    assert data["backbone"]["kind"] == "exported"
    assert "toy/cls_norm" in capsys.readouterr().out


def test_official_dino_checkpoint_is_evaluated(toy_distribution, tmp_path):  # noqa: F811
    """An official DINO/DoRA file (teacher/student dicts with prefixes, an argparse.Namespace of args): Lightning's
    reading of --ckpt_path hyperparameters (torch.load weights_only=True) must not run, the backbone must load."""
    torch.manual_seed(0)
    weights = build_vit("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, num_heads=3).state_dict()
    head = {"head.last_layer.weight_g": torch.ones(16, 1)}
    official = tmp_path / "checkpoint.pth"
    torch.save(
        {
            "teacher": {**{f"backbone.{k}": v for k, v in weights.items()}, **head},
            "student": {**{f"module.backbone.{k}": v for k, v in weights.items()}, **head},
            "args": argparse.Namespace(arch="vit_tiny", patch_size=8),
            "epoch": 1,
        },
        official,
    )
    main(
        [
            "validate",
            "--evaluator=toy",
            f"--ckpt_path={official}",
            "--evaluator.image_size=32",
            *QUIET,
            f"--trainer.default_root_dir={tmp_path}",
        ]
    )
    data = json.loads((tmp_path / "eval" / "toy" / "results_toy.json").read_text())
    assert data["backbone"]["kind"] == "official" and data["backbone"]["which"] == "teacher"
    assert data["metrics"]["toy/cls_norm"] > 0


def print_config(args: list[str], capsys) -> dict:
    with pytest.raises(SystemExit) as exit_info:
        main(["validate", *args, "--ckpt_path=unused.ckpt", "--print_config"])
    assert exit_info.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


def test_shipped_knn_config_parses(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    config = print_config(["--config", "configs/eval/knn.yaml", "--evaluator.ks", "[10,20]"], capsys)
    assert config["evaluator"]["class_path"] == "evaluators.knn.KNNEvaluator"
    assert config["evaluator"]["init_args"]["ks"] == [10, 20]
    assert config["evaluator"]["init_args"]["temperature"] == 0.07
    assert config["evaluator"]["init_args"]["which"] == "teacher"
    assert config["trainer"]["logger"] is False


@pytest.mark.parametrize(
    ("args", "class_path"),
    [
        (["--evaluator", "knn"], "evaluators.knn.evaluator.KNNEvaluator"),
        (["--evaluator=knn"], "evaluators.knn.evaluator.KNNEvaluator"),
        (["--evaluator", "evaluators.knn.evaluator:KNNEvaluator"], "evaluators.knn.evaluator.KNNEvaluator"),
        (["--evaluator", "KNNEvaluator"], "evaluators.knn.evaluator.KNNEvaluator"),
        (["--evaluator", "linear"], "evaluators.linear.evaluator.LinearProbeEvaluator"),
    ],
)
def test_evaluator_names_resolve(args, class_path, capsys):
    assert print_config(args, capsys)["evaluator"]["class_path"] == class_path


@pytest.mark.parametrize(
    "text",
    [
        "evaluator: knn\n",
        "evaluator:\n  class_path: knn\n  init_args:\n    temperature: 7e-2\n    ks: [5]\n",
        "evaluator:\n  class_path: KNNEvaluator\n",  # a registered class name
    ],
)
def test_a_config_may_name_the_evaluator_by_its_short_name(text, tmp_path, capsys):
    config_file = tmp_path / "knn.yaml"
    config_file.write_text(text)
    config = print_config(["--config", str(config_file)], capsys)
    assert config["evaluator"]["class_path"] == "evaluators.knn.evaluator.KNNEvaluator"
    if "ks" in text:  # the other values keep the types the config's loader gave them
        assert config["evaluator"]["init_args"]["temperature"] == 0.07
        assert config["evaluator"]["init_args"]["ks"] == [5]


def test_an_unknown_short_name_in_a_config_is_one_line_naming_file_and_key(tmp_path, capsys):
    config_file = tmp_path / "typo.yaml"
    config_file.write_text("evaluator:\n  class_path: knm\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["validate", "--config", str(config_file), "--ckpt_path=unused.ckpt"])
    assert exit_info.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(
        "dora validate: error: typo.yaml: evaluator: unknown evaluator 'knm'; known: davis, knn"
    )


def test_evaluator_help_lists_its_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["validate", "--evaluator.help", "knn"])
    assert exit_info.value.code in (0, None)
    out = capsys.readouterr().out
    for option in ("--evaluator.ks", "--evaluator.temperature", "--evaluator.data_dir", "--evaluator.which"):
        assert option in out


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("unknown", "unknown evaluator 'nope'; known: davis, knn, linear, segmentation"),
        ("no_ckpt", "--evaluator needs --ckpt_path"),
        ("fit", "--evaluator only applies to `dora validate` (got `dora fit`)"),
        ("missing_file", "does not exist"),
        ("no_backbone", "holds no DoRA/DINO backbone weights"),
        ("only_teacher", "holds no student backbone, only the teacher's"),
        ("bad_size", "not a multiple of the patch size 8"),
        ("bad_option", "ks"),
        ("bad_value", "--evaluator: every k must be >= 1, got ks=[0]"),
        (
            "unknown_option",
            "--evaluator.k: KNNEvaluator has no option 'k' (its options: ks, temperature, chunk_size, data_dir, "
            "image_size, batch_size, num_workers, which, output_dir); did you mean --evaluator.ks?",
        ),
        (
            "deeper_than_the_backbone",
            "--evaluator linear: n_last_blocks=4 exceeds the depth of the checkpoint's backbone (1 blocks); give "
            "--evaluator.n_last_blocks between 1 and 1",
        ),
        ("k_above_the_images", "--evaluator knn: k=100000 exceeds the "),
        (
            "output_dir_through_a_file",
            "--evaluator.output_dir: cannot create '{tmp}/afile/knn' (a part of the path is a file, not a folder); "
            "give a writable folder",
        ),
    ],
)
def test_bad_input_is_a_clear_error(case, message, exported_teacher, tmp_path, capsys):
    empty = tmp_path / "empty.ckpt"
    torch.save({"state_dict": {"layer.weight": torch.zeros(2)}}, empty)
    args = {
        "unknown": ["validate", "--evaluator", "nope", f"--ckpt_path={exported_teacher}"],
        "no_ckpt": ["validate", "--evaluator", "knn"],
        "fit": ["fit", "--evaluator", "knn"],
        "missing_file": ["validate", "--evaluator", "knn", f"--ckpt_path={tmp_path / 'none.ckpt'}"],
        "no_backbone": ["validate", "--evaluator", "knn", f"--ckpt_path={empty}"],
        "only_teacher": [
            "validate",
            "--evaluator",
            "knn",
            "--evaluator.which=student",
            f"--ckpt_path={exported_teacher}",
        ],
        "bad_size": [
            "validate",
            "--evaluator",
            "knn",
            "--evaluator.image_size=36",
            f"--ckpt_path={exported_teacher}",
        ],
        "bad_value": [
            "validate",
            "--evaluator",
            "knn",
            "--evaluator.ks=[0]",
            f"--ckpt_path={exported_teacher}",
        ],
        "unknown_option": [
            "validate",
            "--evaluator",
            "knn",
            "--evaluator.k=3",
            f"--ckpt_path={exported_teacher}",
        ],
        "deeper_than_the_backbone": [
            "validate",
            "--evaluator",
            "linear",
            f"--evaluator.data_dir={write_image_folder(tmp_path / 'images')}",
            f"--ckpt_path={exported_teacher}",
        ],
        "k_above_the_images": [
            "validate",
            "--evaluator",
            "knn",
            "--evaluator.ks=[100000]",
            f"--evaluator.data_dir={write_image_folder(tmp_path / 'images')}",
            f"--ckpt_path={exported_teacher}",
        ],
        "bad_option": [
            "validate",
            "--evaluator",
            "knn",
            "--evaluator.ks=ten",
            f"--ckpt_path={exported_teacher}",
        ],
        "output_dir_through_a_file": [  # said before the evaluation (it was a traceback after it)
            "validate",
            "--evaluator",
            "knn",
            f"--evaluator.output_dir={tmp_path / 'afile' / 'knn'}",
            f"--evaluator.data_dir={tmp_path / 'never_read'}",
            f"--ckpt_path={exported_teacher}",
        ],
    }[case]
    (tmp_path / "afile").write_text("a file, not a folder")
    with pytest.raises(SystemExit) as exit_info:
        main([*args, *QUIET, f"--trainer.default_root_dir={tmp_path}"])
    assert exit_info.value.code == 2
    assert message.format(tmp=tmp_path) in capsys.readouterr().err
    assert not (tmp_path / "eval").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a usable CUDA GPU")
def test_a_gpu_trainer_on_a_machine_without_one_is_one_line(exported_teacher, tmp_path, capsys):
    args = [
        "validate",
        "--evaluator",
        "knn",
        f"--ckpt_path={exported_teacher}",
        f"--trainer.default_root_dir={tmp_path}",
    ]
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--trainer.accelerator=gpu"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "dora validate: error: --trainer options: No supported gpu backend found;" in err
    assert "--trainer.accelerator cpu" in err
    assert not (tmp_path / "eval").exists()
