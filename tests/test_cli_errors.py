"""One line for every user error (issue 14 item 6): bad data, config values, unknown keys and checkpoints that are not
`dora fit` checkpoints end `dora` with `dora SUBCOMMAND: error: ...` on stderr, exit status 2, no traceback; --verbose
or DORA_TRACEBACK=1 shows it. Bugs keep their traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO

from dora_lightning.cli import main
from dora_lightning.data.sources import VideoSourceError, resolve_video_paths
from dora_lightning.errors import is_user_error, one_line, raised_building_trainer

FAST = ["--config", "configs/demo.yaml", "--data.num_workers", "0", "--trainer.max_steps", "1"]


class _Payload:
    """Unpickling this object would touch the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """``dora ARGV`` in-process: asserts exit status 2 and one error line, the last on stderr; returns that line."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    # Lightning may log its own lines ("GPU available: ...") before the failure; ours is the only error and the last
    assert [line for line in lines if "error:" in line] == lines[-1:], err
    assert lines[-1].startswith(f"dora {argv[0]}: error: "), err
    return lines[-1]


@pytest.fixture
def in_repo(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    monkeypatch.chdir(REPO)
    monkeypatch.delenv("DORA_TRACEBACK", raising=False)
    return tmp_path


# ------------------------------------------------------------------------------------------------ data and config
@pytest.mark.parametrize("case", ["missing", "text_as_mp4", "empty_mp4"])
def test_bad_video_isone_line(case, in_repo, capsys):
    video = in_repo / f"{case}.mp4"
    if case == "text_as_mp4":
        video.write_text("this is not a video\n")
    elif case == "empty_mp4":
        video.write_bytes(b"")
    line = _run(
        ["fit", *FAST, "--trainer.default_root_dir", str(in_repo), "--data.paths", str(video)], capsys
    )
    assert str(video) in line
    assert ("does not exist" if case == "missing" else "not a readable video") in line


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("--data.batch_size=-4", "data.batch_size"),
        ("--model.num_objects=99", "model.num_objects"),
        ("--model.teacher_temp=0", "model.teacher_temp must be > 0, got 0.0"),
        ("--model.base_lr=-1", "model.base_lr must be > 0, got -1.0"),
        ("--model.depth=0", "model.depth must be > 0, got 0"),
        (
            "--data.transform.init_args.global_size=60",
            "data.transform.init_args.global_size=60 is not a multiple of the patch size 8 of "
            "model.backbone=vit_tiny_patch16_224; give a multiple of 8 (e.g. 64)",
        ),
        ("--data.transform.init_args.local_size=20", "local_size=20 is not a multiple of the patch size 8"),
    ],
)
def test_refused_config_value_isone_line(override, key, in_repo, capsys):
    line = _run(["fit", *FAST, "--trainer.default_root_dir", str(in_repo), override], capsys)
    assert key in line


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["--model.backbone=vit_nope"], "model.backbone=vit_nope: unknown timm model 'vit_nope'"),
        (
            ["--model.backbone=resnet50"],
            "model.backbone=resnet50: timm model 'resnet50' is not a VisionTransformer",
        ),
        (["--model.embed_dim=50"], "embed_dim=50: dim should be divisible by num_heads"),
    ],
)
def test_a_backbone_timm_cannot_build_is_one_line(overrides, expected, in_repo, capsys):
    line = _run(["fit", *FAST, "--trainer.default_root_dir", str(in_repo), *overrides], capsys)
    assert line.startswith("dora fit: error: model.backbone=") and expected in line, line


def test_a_run_folder_that_cannot_be_created_is_one_line(in_repo, capsys):
    blocked = in_repo / "a_file"
    blocked.write_text("a file where the run folder's parent should be")
    line = _run(["fit", *FAST, "--trainer.default_root_dir", str(blocked / "run")], capsys)
    assert line == (
        f"dora fit: error: trainer.default_root_dir: cannot create '{blocked / 'run'}' (a part of the path is a file, not a folder); give a "
        "writable folder"
    )


def test_a_remote_run_folder_is_left_to_lightning(in_repo, monkeypatch):
    from dora_lightning.cli import DoraCLI

    failed = []
    monkeypatch.setattr(DoraCLI, "_fail", lambda self, message: failed.append(message))
    DoraCLI._check_run_folder(
        object.__new__(DoraCLI), {"trainer": {"default_root_dir": "s3://bucket/runs/a"}}
    )
    assert failed == [] and not (in_repo / "s3:").exists() and not (REPO / "s3:").exists()


def test_unknown_key_is_one_line_without_usage(in_repo, capsys):
    line = _run(["fit", *FAST, "--data.batch_sise", "4"], capsys)
    assert "--data.batch_sise" in line and "did you mean --data.batch_size?" in line


@pytest.mark.parametrize("where", ["command_line", "config"])
def test_an_option_the_transform_lacks_is_named_with_the_ones_it_has(where, in_repo, capsys):
    if where == "config":
        config = in_repo / "typo.yaml"
        config.write_text("data:\n  transform:\n    init_args:\n      global_sz: 3\n")
        typo = ["--config", str(config)]
    else:
        typo = ["--data.transform.global_sz", "3"]
    line = _run(["fit", *FAST, *typo], capsys)
    assert line.startswith(
        "dora fit: error: --data.transform.global_sz: ClipMultiCrop has no option 'global_sz' (its "
    )
    assert "global_size, local_size" in line and "did you mean --data.transform.global_size?" in line


@pytest.mark.parametrize(
    ("where", "key", "value", "expected"),
    [
        ("command_line", "hue", "0.7", "data.transform.init_args.hue: hue must be in [0, 0.5], got 0.7"),
        ("config", "hue", "0.7", "data.transform.init_args.hue: hue must be in [0, 0.5], got 0.7"),
        (
            "config",
            "global_size",
            "0",
            "data.transform.init_args.global_size: global_size must be an integer >= 1, got 0",
        ),
        (
            "command_line",
            "std",
            "[0.2,0,0.2]",
            "data.transform.init_args.std: std values must be > 0, got (0.2, 0.0, 0.2)",
        ),
    ],
)
def test_a_value_the_transform_refuses_is_one_line_naming_it(where, key, value, expected, in_repo, capsys):
    """ClipMultiCrop's refusal came wrapped in jsonargparse's "Does not validate against any of the Union subtypes"
    error, raised by jsonargparse: a traceback with exit status 1."""
    if where == "config":
        config = in_repo / "overlay.yaml"
        config.write_text(f"data:\n  transform:\n    init_args:\n      {key}: {value}\n")
        given = ["--config", str(config)]
    else:
        given = [f"--data.transform.init_args.{key}", value]
    line = _run(["fit", *FAST, "--trainer.default_root_dir", str(in_repo), *given], capsys)
    assert line == f"dora fit: error: {expected}"


def test_a_value_the_transform_refuses_shows_its_traceback_on_demand(in_repo, monkeypatch):
    monkeypatch.setenv("DORA_TRACEBACK", "1")
    with pytest.raises(
        ValueError, match=r"^data.transform.init_args.hue: hue must be in \[0, 0.5\], got 0.7$"
    ):
        main(
            [
                "fit",
                *FAST,
                "--trainer.default_root_dir",
                str(in_repo),
                "--data.transform.init_args.hue",
                "0.7",
            ]
        )


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (
            ["fit", *FAST, "--data.transform.init_args.crop_backend", "nope"],
            "dora fit: error: data.transform.init_args.crop_backend must be one of 'roi_align', 'interpolate', "
            "got nope",
        ),
        (
            ["fit", *FAST, "--model.mask_mode", "nope"],
            "dora fit: error: model.mask_mode must be one of 'keep', 'remove', got nope",
        ),
        (
            [
                "validate",
                "--evaluator",
                "segmentation",
                "--evaluator.optimizer",
                "adam",
                "--ckpt_path",
                "x.ckpt",
            ],
            "dora validate: error: --evaluator.optimizer must be one of 'adamw', 'sgd', got adam",
        ),
        (
            ["fit", *FAST, "--data.transform.init_args.hue", "abc"],
            "dora fit: error: data.transform.init_args.hue: Expected a <class 'float'>. Got value: abc",
        ),
    ],
)
def test_a_value_outside_a_fixed_set_is_one_short_line(argv, expected, in_repo, capsys):
    """jsonargparse's text for a Literal option of a class (crop_backend, an evaluator's optimizer) was several
    hundred characters ("Does not validate against any of the Union subtypes ... Given value: NestedArg(...)")."""
    assert _run([*argv, "--trainer.default_root_dir", str(in_repo)], capsys) == expected


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a usable CUDA GPU")
def test_a_gpu_config_on_a_machine_without_one_says_how_to_run_on_the_cpu(in_repo, capsys):
    line = _run(
        ["fit", *FAST, "--trainer.default_root_dir", str(in_repo), "--trainer.accelerator", "gpu"], capsys
    )
    assert line.startswith("dora fit: error: --trainer options: No supported gpu backend found;"), line
    assert "no usable CUDA GPU" in line and "--trainer.accelerator cpu" in line
    assert not any(in_repo.iterdir()), "nothing is written before the Trainer exists"


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("--trainer.strategy=ddpp", "invalid strategy name: `strategy='ddpp'`"),
        ("--trainer.num_nodes=0", "`num_nodes` must be a positive integer, but got 0"),
    ],
)
def test_trainer_refusing_its_options_is_one_line(override, expected, in_repo, capsys):
    line = _run(["fit", *FAST, "--trainer.default_root_dir", str(in_repo), override], capsys)
    assert line.startswith("dora fit: error: --trainer options: ") and expected in line, line


def test_only_errors_of_the_trainers_construction_count_as_its_options(tmp_path):
    import lightning.pytorch as pl
    from lightning.pytorch.demos.boring_classes import BoringModel

    class BrokenStep(BoringModel):
        def training_step(self, batch, batch_idx):
            raise ValueError("a bug in a step")

    with pytest.raises(ValueError) as refused:
        pl.Trainer(num_nodes=0)
    assert raised_building_trainer(refused.value) and is_user_error(refused.value)
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False, default_root_dir=tmp_path
    )
    with pytest.raises(ValueError) as bug:
        trainer.fit(BrokenStep())
    assert not raised_building_trainer(bug.value) and not is_user_error(bug.value)


# ------------------------------------------------------------------------------------------------ --ckpt_path
@pytest.mark.parametrize("kind", ["random_bytes", "text", "plain_state_dict", "no_lightning_keys", "missing"])
def test_fit_ckpt_path_that_is_not_a_fit_checkpoint(kind, in_repo, capsys):
    ckpt = in_repo / f"{kind}.ckpt"
    if kind == "random_bytes":
        ckpt.write_bytes(os.urandom(4096))
    elif kind == "text":
        ckpt.write_text("epoch=3\nstep=120\n")
    elif kind == "plain_state_dict":
        torch.save({"weight": torch.zeros(3, 3), "bias": torch.zeros(3)}, ckpt)
    elif kind == "no_lightning_keys":
        torch.save({"epoch": 3, "model": {"weight": torch.zeros(2)}}, ckpt)
    line = _run(["fit", *FAST, "--trainer.default_root_dir", str(in_repo), "--ckpt_path", str(ckpt)], capsys)
    assert f"'{ckpt}'" in line and "--ckpt_path" in line
    expected = {
        "random_bytes": "is not a PyTorch checkpoint",
        "text": "is not a PyTorch checkpoint",
        "plain_state_dict": "is a plain state dict",
        "no_lightning_keys": "a dict without Lightning's keys",
        "missing": "does not exist",
    }[kind]
    assert expected in line, line
    assert "written by `dora fit`" in line or "not a `dora fit` checkpoint" in line, line


def test_fit_ckpt_path_never_runs_a_pickle(in_repo, capsys):
    marker = in_repo / "payload_ran"
    ckpt = in_repo / "crafted.ckpt"
    torch.save({"state_dict": {}, "pytorch-lightning_version": "2.6.0", "dora": _Payload(marker)}, ckpt)
    assert not marker.exists()
    line = _run(["fit", *FAST, "--trainer.default_root_dir", str(in_repo), "--ckpt_path", str(ckpt)], capsys)
    assert f"'{ckpt}'" in line and "never unpickled" in line
    assert not marker.exists(), "the pickle's payload ran"


def test_validate_names_the_subcommand(in_repo, capsys):
    ckpt = in_repo / "plain.ckpt"
    torch.save({"weight": torch.zeros(2)}, ckpt)
    line = _run(["validate", "--evaluator", "knn", "--ckpt_path", str(ckpt)], capsys)
    assert (
        line.startswith("dora validate: error: --ckpt_path: ")
        and "holds no DoRA/DINO backbone weights" in line
    )


# ------------------------------------------------------------------------------------------------ tracebacks on demand
def test_dora_traceback_env_shows_the_traceback(in_repo, monkeypatch, capsys):
    argv = ["fit", *FAST, "--trainer.default_root_dir", str(in_repo), "--data.batch_size=-4"]
    monkeypatch.setenv("DORA_TRACEBACK", "0")
    assert "data.batch_size must be >= 1" in _run(argv, capsys)
    monkeypatch.setenv("DORA_TRACEBACK", "1")
    with pytest.raises(ValueError, match="data.batch_size must be >= 1"):
        main(argv)


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        ("1", True),
        ("true", True),
        ("YES", True),
        ("On", True),
        ("0", False),
        ("false", False),
        ("no", False),
        ("", False),
    ],
)
def test_dora_traceback_takes_true_and_false_words(value, shown, monkeypatch):
    """DORA_TRACEBACK=false or =no asked for tracebacks (anything but empty or 0 did), unlike JSONARGPARSE_DEBUG."""
    from dora_lightning.errors import wants_traceback

    monkeypatch.setenv("DORA_TRACEBACK", value)
    assert wants_traceback() is shown


def test_verbose_flag_shows_the_traceback_from_the_console_script(in_repo):
    dora = Path(sys.executable).parent / "dora"
    env = {k: v for k, v in os.environ.items() if k != "DORA_TRACEBACK"}
    argv = [str(dora), "fit", *FAST, "--trainer.default_root_dir", str(in_repo), "--model.num_objects=99"]
    quiet = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, env=env)
    loud = subprocess.run([*argv, "--verbose"], capture_output=True, text=True, cwd=REPO, env=env)
    assert quiet.returncode == 2 and "Traceback" not in quiet.stderr, quiet.stderr
    assert quiet.stderr.strip().splitlines()[-1].startswith("dora fit: error: model.num_objects=99")
    assert loud.returncode == 1 and "Traceback" in loud.stderr, loud.stderr
    assert loud.stderr.strip().splitlines()[-1].startswith("ValueError: model.num_objects=99")


def test_export_error_is_one_line_and_verbose_shows_the_traceback(tmp_path, monkeypatch, capsys):
    from dora_lightning.export import main as export_main

    monkeypatch.delenv("DORA_TRACEBACK", raising=False)
    ckpt, out = tmp_path / "random.ckpt", tmp_path / "out.pth"
    ckpt.write_bytes(os.urandom(2048))
    assert export_main([str(ckpt), str(out)]) != 0
    err = capsys.readouterr().err
    assert (
        err.startswith(f"dora export: error: '{ckpt}' is not a PyTorch checkpoint") and err.count("\n") == 1
    ), err
    with pytest.raises(ValueError, match="is not a PyTorch checkpoint"):
        export_main([str(ckpt), str(out), "--verbose"])
    monkeypatch.setenv("DORA_TRACEBACK", "1")
    with pytest.raises(ValueError, match="is not a PyTorch checkpoint"):
        export_main([str(ckpt), str(out)])
    assert not out.exists()


# ------------------------------------------------------------------------------------------------ the rule
def _raised(fn, *args):
    try:
        fn(*args)
    except Exception as err:  # noqa: BLE001 - the test inspects what was raised
        return err
    raise AssertionError("nothing was raised")


def test_data_error_from_a_dataloader_worker_isone_line(tmp_path):
    from torch._utils import ExceptionWrapper

    original = _raised(resolve_video_paths, str(tmp_path / "gone.mp4"))
    assert isinstance(original, VideoSourceError)
    try:
        raise original
    except VideoSourceError:
        wrapped = _raised(ExceptionWrapper(where="in DataLoader worker process 0").reraise)
    assert "Original Traceback" in str(wrapped) and len(str(wrapped).splitlines()) > 3
    assert is_user_error(wrapped)
    assert one_line(wrapped) == str(original)


def test_bugs_keep_their_traceback():
    assert not is_user_error(_raised(torch.zeros(2).view, 3))  # torch's RuntimeError
    assert not is_user_error(_raised(int, "x"))  # a ValueError raised outside the data/config/checkpoint code
    assert not is_user_error(_raised(lambda: {}["key"]))
