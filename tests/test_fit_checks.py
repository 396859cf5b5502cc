"""`dora fit`'s checks of the run folder and of --ckpt_path / --init_from, made before anything trains: `~` in paths,
checkpoint and log folders that cannot be written, a new run into a folder holding another run's checkpoints,
checkpoints that hold weights but not a run's state, Lightning's --ckpt_path keywords and an empty value."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from conftest import REPO
from test_cli import MICRO_ARGS

from dora_lightning.checkpoint_formats import PRETRAIN_KIND
from dora_lightning.cli import main
from dora_lightning.runs import (
    CheckpointRefused,
    checkpoint_folders,
    find_last_checkpoint,
    model_differences,
    refuse_other_model,
)

VIDEO = REPO / "assets" / "video" / "vtest.mp4"
CHECKPOINT = "lightning.pytorch.callbacks.ModelCheckpoint"


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh $HOME (what `~` expands to) and working directory (where a folder named `~` would appear)."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DORA_TRACEBACK", raising=False)
    return home


def _args(root: str | Path, *extra: str, steps: int = 2) -> list[str]:
    return [
        "fit",
        *MICRO_ARGS,
        f"--data.paths={VIDEO}",
        f"--trainer.max_steps={steps}",
        f"--trainer.default_root_dir={root}",
        *extra,
    ]


def _refused(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """``dora ARGV`` in-process: exit status 2, one error line and no traceback; returns that line."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    return lines[0]


def _fake_checkpoint(folder: Path, name: str = "epoch=0-step=2.ckpt") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(b"another run's checkpoint")
    return folder / name


# ------------------------------------------------------------------------------------------------ `~`
def test_checkpoint_folders_expand_the_home_folder(home: Path) -> None:
    """Lightning writes `~/runs/x` under $HOME; `--ckpt_path last` must look there (it looked in './~/runs/x')."""
    callback = {"class_path": CHECKPOINT, "init_args": {"dirpath": "~/elsewhere"}}
    assert checkpoint_folders({"default_root_dir": "~/runs/x"}) == [home / "runs" / "x" / "checkpoints"]
    assert checkpoint_folders({"callbacks": [callback]}) == [home / "elsewhere"]


@pytest.mark.parametrize("option", ["--ckpt_path", "--init_from"])
def test_ckpt_path_and_init_from_expand_the_home_folder(option: str, home: Path, capsys) -> None:
    """A file given as `~/...` is read (here: refused for what it holds), not reported missing."""
    (home / "ck.ckpt").write_text("not a checkpoint\n")
    line = _refused(capsys, _args(home / "run", f"{option}=~/ck.ckpt"))
    assert f"'{home / 'ck.ckpt'}'" in line and "is not a PyTorch checkpoint" in line, line


@pytest.mark.slow
def test_a_run_folder_under_the_home_folder_resumes_with_last(home: Path, capsys) -> None:
    """`trainer.default_root_dir: ~/runs/t` (a config, or `--trainer.default_root_dir=~/runs/t`): the restart with
    `--ckpt_path last` continues the run (it started from scratch and replaced last.ckpt)."""
    config = home.parent / "tilde.yaml"
    config.write_text("trainer:\n  default_root_dir: ~/runs/t\n")
    argv = ["fit", *MICRO_ARGS, f"--data.paths={VIDEO}", "--config", str(config)]
    main([*argv, "--trainer.max_steps=2"])
    folder = home / "runs" / "t" / "checkpoints"
    assert torch.load(find_last_checkpoint([folder]), weights_only=True)["global_step"] == 2
    capsys.readouterr()
    main([*argv, "--trainer.max_steps=3", "--ckpt_path=last"])
    err = capsys.readouterr().err
    assert "no checkpoint in" not in err and "continuing after step 2" in err, err
    assert torch.load(find_last_checkpoint([folder]), weights_only=True)["global_step"] == 3
    assert not (home.parent / "~").exists()


# ------------------------------------------------------------------------------------------------ unwritable
@contextmanager
def unwritable(folder: Path) -> Iterator[None]:
    """``folder`` made unwritable for this process: `chattr +i` as root (root writes through permissions), else
    read-only permissions; the test is skipped where neither works."""
    folder.mkdir(parents=True, exist_ok=True)
    undo: list[str] = []
    if os.geteuid() == 0 and shutil.which("chattr"):
        if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0:
            undo = ["chattr", "-i", str(folder)]
    else:
        folder.chmod(0o555)
    try:
        if os.access(folder, os.W_OK):
            pytest.skip("cannot make a folder unwritable here")
        yield
    finally:
        if undo:
            subprocess.run(undo, check=True)
        folder.chmod(0o755)


@pytest.mark.parametrize("where", ["checkpoints", "dirpath", "lightning_logs"])
def test_a_checkpoint_or_log_folder_that_cannot_be_written_is_one_line(
    where: str, home: Path, capsys
) -> None:
    """A writable run folder whose checkpoints/ (or a ModelCheckpoint's dirpath, or the logger's folder) cannot be
    written, e.g. made by an earlier run under sudo or docker: refused before training (it failed at the first save,
    after an epoch of training, with a PermissionError traceback)."""
    root = home / "run"
    root.mkdir()
    folder = {
        "checkpoints": root / "checkpoints",
        "dirpath": home / "ck",
        "lightning_logs": root / "lightning_logs",
    }
    extra = []
    if where == "dirpath":
        callback = {"class_path": CHECKPOINT, "init_args": {"dirpath": str(folder[where])}}
        extra = [f"--trainer.callbacks+={json.dumps(callback)}"]
    with unwritable(folder[where]):
        line = _refused(capsys, _args(root, *extra))
    key = "ModelCheckpoint dirpath" if where == "dirpath" else "trainer.default_root_dir"
    assert line == (
        f"dora fit: error: {key}: '{folder[where]}' is not writable by this user; give a writable folder"
    ), line


# ------------------------------------------------------------------------------------------------ a new run
@pytest.mark.parametrize("new_run", [[], ["--init_from=other.ckpt"]])
def test_a_new_run_into_a_folder_holding_checkpoints_is_refused(
    new_run: list[str], home: Path, capsys
) -> None:
    """configs/demo.yaml names its checkpoints epoch=E-step=S.ckpt without a version counter: a second new run in
    the same folder replaced the first run's files (and re-pointed last.ckpt)."""
    root = home / "run"
    kept = _fake_checkpoint(root / "checkpoints")
    line = _refused(capsys, _args(root, *new_run))
    assert line.startswith(
        f"dora fit: error: trainer.default_root_dir: '{root / 'checkpoints'}' already holds the checkpoints of a run "
        "(newest: epoch=0-step=2.ckpt)"
    ), line
    assert ("--ckpt_path last" in line) == (not new_run) and "another trainer.default_root_dir" in line
    assert kept.read_bytes() == b"another run's checkpoint"


def test_a_new_run_into_a_checkpoint_dirpath_holding_checkpoints_is_refused(home: Path, capsys) -> None:
    _fake_checkpoint(home / "ck", "last.ckpt")
    callback = {"class_path": CHECKPOINT, "init_args": {"dirpath": "~/ck"}}
    flow = json.dumps(callback)
    line = _refused(capsys, _args(home / "run", f"--trainer.callbacks+={flow}"))
    assert f"ModelCheckpoint dirpath: '{home / 'ck'}' already holds the checkpoints of a run" in line, line


# ------------------------------------------------------------------------------------------------ --ckpt_path values
@pytest.mark.parametrize("value", ["best", "hpc", "registry", "registry:me/model:v1", ""])
def test_lightning_keywords_and_an_empty_ckpt_path_are_one_line(value: str, home: Path, capsys) -> None:
    """`--ckpt_path "$RESUME"` with RESUME unset, and Lightning's keywords, ended in Lightning's tracebacks."""
    line = _refused(capsys, _args(home / "run", "--ckpt_path", value))
    assert ("is empty (an unset shell variable?)" if not value else f"--ckpt_path {value}: ") in line, line
    assert "`last`" in line


def test_the_ckpt_path_help_is_dora_fits(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    text = out.split("--ckpt_path CKPT_PATH ", 1)[1].split(" --weights_only", 1)[0]
    assert "the newest .ckpt in this run's checkpoint folder" in text and "--init_from" in text, text
    assert "previous ``trainer.fit`` call" not in text and "are not taken" in text


def test_a_random_init_checkpoint_is_refused_for_resuming(home: Path, capsys) -> None:
    """`dora compare`'s random_init.ckpt holds weights, no run state: Lightning failed with
    KeyError: 'pytorch-lightning_version'."""
    ckpt = home / "random_init.ckpt"
    torch.save(
        {"state_dict": {}, "hyper_parameters": {}, "dora": {"kind": PRETRAIN_KIND, "random_init": True}}, ckpt
    )
    line = _refused(capsys, _args(home / "run", f"--ckpt_path={ckpt}"))
    assert f"'{ckpt}' is `dora compare`'s random initialisation" in line and f"--init_from {ckpt}" in line, (
        line
    )


@pytest.mark.slow
def test_a_weights_only_checkpoint_picked_by_last_is_refused(home: Path, capsys) -> None:
    """A ModelCheckpoint with save_weights_only: `--ckpt_path last` picks its file; Lightning failed with
    KeyError: 'Trying to restore optimizer state but checkpoint contains only the model'."""
    callback = {"class_path": CHECKPOINT, "init_args": {"save_weights_only": True, "save_last": True}}
    flow = json.dumps(callback)
    root = home / "run"
    main(_args(root, f"--trainer.callbacks+={flow}"))
    line = _refused(capsys, _args(root, f"--trainer.callbacks+={flow}", "--ckpt_path=last", steps=4))
    assert "(--ckpt_path last picked it: the newest checkpoint of this run)" in line, line
    assert "without its optimiser and loop state" in line and "--init_from" in line


# ------------------------------------------------------------------------------------------------ small ones
def test_a_changed_data_seed_is_named_as_data_seed() -> None:
    """model.seed is linked from data.seed (--model.seed is refused): a difference names the option to set."""
    assert model_differences({"seed": 1, "depth": 2}, {"seed": 0, "depth": 2}) == ["data.seed 0 -> 1"]
    with pytest.raises(CheckpointRefused, match=r"other settings \(data.seed 0 -> 1\)"):
        refuse_other_model(Path("x.ckpt"), {"hyper_parameters": {"seed": 0}}, {"seed": 1})
    with pytest.raises(CheckpointRefused, match=r"other model settings \(model.depth 2 -> 3\)"):
        refuse_other_model(Path("x.ckpt"), {"hyper_parameters": {"depth": 2}}, {"depth": 3})


def test_accumulate_grad_batches_zero_is_one_line(home: Path, capsys) -> None:
    """It was a ZeroDivisionError traceback at train start."""
    line = _refused(capsys, _args(home / "run", "--trainer.accumulate_grad_batches=0"))
    assert "trainer.accumulate_grad_batches must be >= 1" in line and "got 0" in line, line


@pytest.mark.slow
def test_a_fast_dev_run_into_a_folder_holding_checkpoints_is_taken(home: Path) -> None:
    """`--trainer.fast_dev_run` (a smoke test of the real config, in the real run folder) writes no checkpoint."""
    root = home / "run"
    kept = _fake_checkpoint(root / "checkpoints")
    main(_args(root, "--trainer.fast_dev_run=1"))
    assert [p.name for p in (root / "checkpoints").iterdir()] == [kept.name]
    assert kept.read_bytes() == b"another run's checkpoint"


def test_a_configuration_error_leaves_no_run_folder(tmp_path: Path, capsys) -> None:
    """The run folder was made before the options were checked: an empty folder was left by every refused run."""
    line = _refused(capsys, _args(tmp_path / "runs" / "a", "--data.batch_size=0"))
    assert "data.batch_size must be >= 1, got 0" in line
    assert not (tmp_path / "runs").exists()
