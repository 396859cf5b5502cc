"""A run's folder and what may resume it: atomic checkpoint writes, `--ckpt_path last`, refusing another run's
checkpoint (other data or model), `--init_from`, and `last.ckpt` as a link."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml
from conftest import REPO
from test_cli import MICRO_ARGS

from dora_lightning.checkpoint_io import AtomicCheckpointIO, remove_stale_temp_files, write_atomically
from dora_lightning.cli import DoraCLI, main
from dora_lightning.data.datamodule import VideoClipDataModule
from dora_lightning.module import DoRAModule
from dora_lightning.runs import checkpoint_folders, find_last_checkpoint, model_differences, use_run_folder

VIDEO = REPO / "assets" / "video" / "vtest.mp4"
OTHER_VIDEO = REPO / "assets" / "video" / "photo_walk.mp4"


# ------------------------------------------------------------------------------------------ atomic writes
class _Unpicklable:
    def __reduce__(self):
        raise RuntimeError("killed mid-write")


def test_atomic_write_replaces_the_target_and_leaves_no_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "last.ckpt"
    write_atomically({"step": 1}, target)
    write_atomically({"step": 2}, target)
    assert torch.load(target, weights_only=True) == {"step": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_a_failed_write_keeps_the_old_checkpoint_and_removes_its_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "last.ckpt"
    write_atomically({"step": 1}, target)
    with pytest.raises(RuntimeError, match="killed mid-write"):
        write_atomically({"step": 2, "bad": _Unpicklable()}, target)
    assert torch.load(target, weights_only=True) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_temp_files_of_dead_writers_are_removed_and_live_ones_kept(tmp_path: Path) -> None:
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead_pid = int(dead.stdout)
    stale = tmp_path / f".epoch=0-step=2.ckpt.tmp-{dead_pid}-0a1b2c3d"
    live = tmp_path / f".last.ckpt.tmp-{os.getppid()}-0a1b2c3d"  # our parent is running
    unrelated = tmp_path / ".notes.tmp-12"
    for path in (stale, live, unrelated):
        path.write_bytes(b"partial")
    AtomicCheckpointIO().save_checkpoint({"step": 3}, tmp_path / "last.ckpt")
    assert not stale.exists() and live.exists() and unrelated.exists()
    assert remove_stale_temp_files(tmp_path) == []


KILLED_WRITER = """
import sys, torch
from pathlib import Path
from dora_lightning.checkpoint_io import AtomicCheckpointIO
io, target = AtomicCheckpointIO(), Path(sys.argv[1])
for step in range(10_000):
    io.save_checkpoint({"step": step, "weights": torch.full((4_000_000,), float(step))}, target)
    print(step, flush=True)
"""


@pytest.mark.parametrize("delay", [0.0, 0.05, 0.13])
def test_kill_9_during_writes_leaves_a_whole_checkpoint(tmp_path: Path, delay: float) -> None:
    """A writer killed with SIGKILL at an arbitrary moment: the target is always a whole checkpoint (16 MB each), and
    the killed writer's temporary file goes at the next save into the folder."""
    target = tmp_path / "last.ckpt"
    writer = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER, str(target)], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    assert writer.stdout is not None
    writer.stdout.readline()  # the first checkpoint is complete
    time.sleep(delay)
    writer.kill()
    writer.wait()
    step = torch.load(target, weights_only=True)
    assert torch.equal(step["weights"], torch.full((4_000_000,), float(step["step"])))
    AtomicCheckpointIO().save_checkpoint({"step": -1}, tmp_path / "other.ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "other.ckpt"]


def test_dora_fit_trainers_write_into_the_run_folder_atomically(tmp_path: Path) -> None:
    trainer = pl.Trainer(default_root_dir=tmp_path / "run", logger=False, enable_progress_bar=False)
    use_run_folder(trainer)
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    assert trainer.checkpoint_callback.dirpath == os.path.realpath(tmp_path / "run" / "checkpoints")


# ------------------------------------------------------------------------------------------ finding `last`
def test_checkpoint_folders_follow_default_root_dir_unless_a_dirpath_is_given(tmp_path: Path) -> None:
    callback = {
        "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
        "init_args": {"save_last": "link"},
    }
    fixed = {
        "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
        "init_args": {"dirpath": "elsewhere"},
    }
    other = {"class_path": "lightning.pytorch.callbacks.LearningRateMonitor"}
    config = {"default_root_dir": str(tmp_path), "callbacks": [callback, fixed, other]}
    assert checkpoint_folders(config) == [tmp_path / "checkpoints", Path("elsewhere")]
    assert checkpoint_folders({"default_root_dir": "r"}) == [Path("r") / "checkpoints"]
    assert checkpoint_folders({"enable_checkpointing": False}) == []


def test_last_is_the_newest_checkpoint_of_the_run_folders(tmp_path: Path) -> None:
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    assert find_last_checkpoint([folder, tmp_path / "missing"]) is None
    (folder / "epoch=0-step=2.ckpt").write_bytes(b"x")
    (folder / "last.ckpt").symlink_to("epoch=0-step=2.ckpt")
    (folder / ".last.ckpt.tmp-1-ab").write_bytes(b"x")
    (folder / "dangling-last.ckpt").symlink_to("gone.ckpt")
    assert find_last_checkpoint([folder]) == folder / "last.ckpt"
    newer = folder / "latest-step-9.ckpt"  # a rolling checkpoint written after last.ckpt's target
    newer.write_bytes(b"x")
    os.utime(newer, (1e10, 1e10))
    assert find_last_checkpoint([folder]) == newer


def test_last_is_the_checkpoint_furthest_into_the_run_whatever_its_time(tmp_path: Path) -> None:
    """A run folder copied without its times (`cp -r`): an older stop's checkpoint can be the newest file."""
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    for name, step, mtime in [("stopped-step=10.ckpt", 10, 3e9), ("epoch=1-step=20.ckpt", 20, 2e9)]:
        torch.save({"global_step": step, "state_dict": {"w": torch.zeros(2)}}, folder / name)
        os.utime(folder / name, (mtime, mtime))
    (folder / "last.ckpt").symlink_to("epoch=1-step=20.ckpt")
    os.utime(folder / "last.ckpt", (1e9, 1e9), follow_symlinks=False)
    assert find_last_checkpoint([folder]) == folder / "last.ckpt"
    (folder / "last.ckpt").unlink()
    assert find_last_checkpoint([folder]) == folder / "epoch=1-step=20.ckpt"


def test_model_differences_name_the_options_that_changed() -> None:
    saved = {"depth": 2, "base_lr": 0.0005, "log_images_every_n_steps": 500, "old_option": 1}
    now = {"depth": 4, "base_lr": 0.0005, "log_images_every_n_steps": 10, "new_option": 3}
    assert model_differences(now, saved) == ["model.depth 2 -> 4"]


# ------------------------------------------------------------------------------------------ the command
def _config(tmp_path: Path) -> Path:
    path = tmp_path / "ckpt.yaml"
    callback = {
        "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
        "init_args": {"save_last": "link", "every_n_train_steps": 1, "save_top_k": 1},
    }
    path.write_text(yaml.safe_dump({"trainer": {"callbacks": [callback]}}))
    return path


def _fit(tmp_path: Path, root: Path, *extra: str, video: Path = VIDEO, steps: int = 2) -> None:
    main(
        [
            "fit",
            "--config",
            str(_config(tmp_path)),
            *MICRO_ARGS,
            f"--data.paths={video}",
            f"--trainer.max_steps={steps}",
            f"--trainer.default_root_dir={root}",
            *extra,
        ]
    )


def _refused(capsys, tmp_path: Path, root: Path, *extra: str, video: Path = VIDEO) -> str:
    with pytest.raises(SystemExit) as exit_info:
        _fit(tmp_path, root, *extra, video=video)
    assert exit_info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("dora fit: error:")]
    assert len(lines) == 1
    return lines[0]


@pytest.fixture(scope="module")
def first_run(tmp_path_factory) -> Path:
    """A finished 2-step run; its folder is copied by each test that resumes it."""
    tmp_path = tmp_path_factory.mktemp("first_run")
    _fit(tmp_path, tmp_path / "run")
    return tmp_path / "run"


@pytest.mark.slow
def test_checkpoints_live_in_the_run_folder_and_last_is_a_link(first_run: Path) -> None:
    folder = first_run / "checkpoints"
    last = folder / "last.ckpt"
    assert last.is_symlink() and last.resolve().parent == folder.resolve()
    assert torch.load(last, weights_only=True)["global_step"] == 2
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]


@pytest.mark.slow
def test_last_without_a_checkpoint_starts_a_new_run_and_says_so(tmp_path: Path, capsys) -> None:
    _fit(tmp_path, tmp_path / "new", "--ckpt_path=last", steps=1)
    err = capsys.readouterr().err
    assert f"dora fit: --ckpt_path last: no checkpoint in '{tmp_path / 'new' / 'checkpoints'}' yet" in err
    assert "HINT" not in err
    assert torch.load(tmp_path / "new" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 1


@pytest.mark.slow
def test_last_resumes_this_runs_checkpoint(tmp_path: Path, first_run: Path) -> None:
    run = tmp_path / "run"
    _fit(tmp_path, run, steps=2)
    _fit(tmp_path, run, "--ckpt_path=last", steps=3)
    folder = run / "checkpoints"
    assert torch.load(folder / "last.ckpt", weights_only=True)["global_step"] == 3
    assert sorted(p.name for p in folder.iterdir()) == [
        "epoch=0-step=3.ckpt",
        "last.ckpt",
    ]  # save_top_k 1 kept
    moved = (
        tmp_path / "moved"
    )  # a run folder copied elsewhere: Lightning versions the new link, `last` finds it
    shutil.copytree(run, moved, symlinks=True)
    _fit(tmp_path, moved, "--ckpt_path=last", steps=4)
    assert torch.load(find_last_checkpoint([moved / "checkpoints"]), weights_only=True)["global_step"] == 4


@pytest.mark.slow
def test_a_checkpoint_of_other_data_is_refused_naming_the_videos(
    tmp_path: Path, first_run: Path, capsys
) -> None:
    run = tmp_path / "run"
    shutil.copytree(first_run, run, symlinks=True)
    line = _refused(capsys, tmp_path, run, "--ckpt_path=last", video=OTHER_VIDEO)
    assert "belongs to a run on other data" in line and "vtest.mp4" in line and "photo_walk.mp4" in line
    assert "--init_from" in line
    line = _refused(capsys, tmp_path, run, "--ckpt_path=last", "--data.frame_stride=5")
    assert "data.frame_stride 10 -> 5" in line
    assert (
        torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2
    )  # nothing written


@pytest.mark.slow
def test_a_checkpoint_of_another_model_is_refused_before_lightning_reads_it(
    tmp_path: Path, first_run: Path, capsys
) -> None:
    ckpt = first_run / "checkpoints" / "last.ckpt"
    line = _refused(capsys, tmp_path, tmp_path / "other", f"--ckpt_path={ckpt}", "--model.depth=3")
    assert "model.depth 2 -> 3" in line and f"--init_from {ckpt}" in line


@pytest.mark.slow
def test_init_from_starts_a_new_run_from_another_runs_weights(
    tmp_path: Path, first_run: Path, capsys
) -> None:
    ckpt = first_run / "checkpoints" / "last.ckpt"
    cli = DoraCLI(
        DoRAModule,
        VideoClipDataModule,
        args=[*MICRO_ARGS, f"--data.paths={OTHER_VIDEO}", f"--init_from={ckpt}", "--model.base_lr=0.001"],
        run=False,
    )
    saved = torch.load(ckpt, weights_only=True)["state_dict"]
    assert all(torch.equal(saved[k], v) for k, v in cli.model.state_dict().items())
    line = _refused(capsys, tmp_path, tmp_path / "x", f"--init_from={ckpt}", f"--ckpt_path={ckpt}")
    assert "give one" in line
    line = _refused(capsys, tmp_path, tmp_path / "y", f"--init_from={ckpt}", "--model.depth=3")
    assert "another architecture" in line and "model.depth 2 -> 3" in line


def logged_steps(run: Path, tag: str = "train/loss") -> tuple[list[str], list[int]]:
    """The run's TensorBoard folders and the steps of ``tag`` as TensorBoard shows them (purged steps hidden)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    folders = sorted(p.name for p in (run / "lightning_logs").iterdir())
    events = EventAccumulator(str(run / "lightning_logs" / folders[-1]))
    events.Reload()
    return folders, [event.step for event in events.Scalars(tag)]


@pytest.mark.slow
def test_a_resumed_run_logs_on_in_its_tensorboard_folder(tmp_path: Path) -> None:
    """Stopped after step 4, resumed from its step-2 checkpoint to step 6: one TensorBoard folder whose curve has
    the steps of an uninterrupted 6-step run, each once (what the stopped run logged after step 2 is hidden)."""
    every_step = ["--trainer.log_every_n_steps=1"]
    _fit(tmp_path, tmp_path / "straight", *every_step, steps=6)
    _, straight = logged_steps(tmp_path / "straight")
    run = tmp_path / "run"
    saver = '{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"every_n_train_steps": 2, "save_top_k": -1, "filename": "{step}"}}'
    _fit(tmp_path, run, *every_step, f"--trainer.callbacks+={saver}", steps=4)
    _fit(tmp_path, run, *every_step, f"--ckpt_path={run / 'checkpoints' / 'step=2.ckpt'}", steps=6)
    folders, resumed = logged_steps(run)
    assert folders == ["version_0"]
    assert resumed == straight and len(straight) >= 5
    # an explicit logger is left as given: a new folder
    _fit(
        tmp_path,
        run,
        *every_step,
        "--trainer.logger=TensorBoardLogger",
        f"--trainer.logger.save_dir={run}",
        "--ckpt_path=last",
        steps=7,
    )
    assert sorted(p.name for p in (run / "lightning_logs").iterdir()) == ["version_0", "version_1"]


def test_init_from_names_the_sizes_the_checkpoint_holds(tmp_path: Path) -> None:
    """A size the checkpoint's config left unset (None: the timm model's own) was shown as None
    (`model.embed_dim None -> 96`); the refusal names the size its weights hold."""
    from dora_lightning.checkpoint_formats import PRETRAIN_KIND
    from dora_lightning.runs import CheckpointRefused, load_initial_weights

    saved = {
        "student.backbone.cls_token": torch.zeros(1, 1, 192),
        "student.backbone.patch_embed.proj.weight": torch.zeros(192, 3, 8, 8),
        "student.backbone.blocks.3.norm1.weight": torch.zeros(192),
    }
    ckpt = tmp_path / "run.ckpt"
    torch.save(
        {
            "dora": {"kind": PRETRAIN_KIND},
            "state_dict": saved,
            "hyper_parameters": {"backbone": "vit_tiny_patch16_224", "embed_dim": None, "depth": 4},
        },
        ckpt,
    )
    module = torch.nn.Module()
    module.student = torch.nn.Module()
    module.student.backbone = torch.nn.Module()
    module.student.backbone.cls_token = torch.nn.Parameter(torch.zeros(1, 1, 96))
    with pytest.raises(CheckpointRefused, match=r"holds another architecture \(model.embed_dim 192 -> 96\)"):
        load_initial_weights(module, ckpt, {"backbone": "vit_tiny_patch16_224", "embed_dim": 96, "depth": 4})
