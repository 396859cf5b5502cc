"""`fit --ckpt_path` on another layout (other loader workers, processes or batch size; the same global batch): the
epoch continues with the clips the checkpoint's run had not taken, the optimiser steps keep their count, and a run
resumed on its new layout is exact again."""

from __future__ import annotations

import subprocess
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from conftest import write_video
from lightning.pytorch.callbacks import ModelCheckpoint
from test_module import MICRO, make_data, make_trainer
from test_resume import BatchCounter, weights
from test_stopping_commands import fit_command

from dora_lightning.cli import main
from dora_lightning.module import DoRAModule
from dora_lightning.runs import find_last_checkpoint

EPOCHS = 2
PER_EPOCH = 18  # 40 frames give 37 clip starts: 36 clips, 18 batches of 2 (2 workers: 9 each)


@pytest.fixture(scope="module")
def walk(tmp_path_factory) -> Path:
    return write_video(tmp_path_factory.mktemp("layout") / "walk.mp4", 40, width=96, height=64)


def fit(
    root: Path, video: Path, workers: int, batch_size: int = 2, accumulate: int = 1, ckpt=None, save=False
):
    """A micro run of EPOCHS epochs; the batches it trained on ((epoch, index, clips)) and its module."""
    counter = BatchCounter()
    savers = [
        ModelCheckpoint(dirpath=root, every_n_train_steps=1, save_top_k=-1, filename="{step}"),
        ModelCheckpoint(dirpath=root, every_n_epochs=1, save_top_k=-1, filename="end-{epoch}"),
    ]
    module = DoRAModule(**(MICRO | {"batch_size": batch_size}))
    trainer = make_trainer(
        root,
        -1,
        max_epochs=EPOCHS,
        accumulate_grad_batches=accumulate,
        enable_checkpointing=save,
        callbacks=[counter, *(savers if save else [])],
    )
    data = make_data(video, num_workers=workers, batch_size=batch_size)
    trainer.fit(module, datamodule=data, ckpt_path=str(ckpt) if ckpt else None)
    return module, counter.batches, trainer


def clips(batches, epoch: int) -> list[tuple[int, int]]:
    return [tuple(c) for e, _, chunk in batches if e == epoch for c in chunk]


def straight_run(tmp_path_factory, walk, workers: int):
    root = tmp_path_factory.mktemp(f"workers{workers}")
    pl.seed_everything(0)
    _, batches, _ = fit(root, walk, workers=workers, save=True)
    assert len(batches) == EPOCHS * PER_EPOCH
    return root, batches


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory, walk):
    return straight_run(tmp_path_factory, walk, 2)


@pytest.mark.slow
@pytest.mark.parametrize(
    "workers, resumed_workers, resumed_at, epoch_clips",
    [
        (2, 1, 5, 10 + 26),  # 27 starts left: 13 batches of 2
        (1, 2, 6, 10 + 24),  # 27 starts left: 2 workers x 6 batches of 2 (3 starts left over), after 6 of 18
    ],
)
def test_other_workers_continue_the_epoch_with_the_clips_not_taken(
    tmp_path, tmp_path_factory, walk, capfd, workers, resumed_workers, resumed_at, epoch_clips
):
    root, before = straight_run(tmp_path_factory, walk, workers)
    capfd.readouterr()
    module, after, trainer = fit(
        tmp_path / "b", walk, workers=resumed_workers, ckpt=root / "step=5.ckpt", save=True
    )
    change = f"{workers} worker{'s' * (workers > 1)} x batch 2 -> 1 process x {resumed_workers} worker"
    assert f"dora fit: resuming on another layout (1 process x {change}" in capfd.readouterr().err
    assert [b[:2] for b in after] == [(0, i) for i in range(resumed_at, PER_EPOCH)] + [
        (1, i) for i in range(PER_EPOCH)
    ]
    epoch0 = clips(before[:5], 0) + clips(after, 0)
    assert len(epoch0) == len(set(epoch0)) == epoch_clips  # no clip twice in the epoch
    steps = 5 + PER_EPOCH - resumed_at + PER_EPOCH
    assert trainer.global_step == steps

    # the resumed run is exact again on its own layout: mid-way through the rest, and in the next epoch
    for step in (9, steps - PER_EPOCH + 3):
        resumed, batches, _ = fit(
            tmp_path / f"c{step}", walk, workers=resumed_workers, ckpt=tmp_path / "b" / f"step={step}.ckpt"
        )
        assert batches == after[step - 5 :]
        torch.testing.assert_close(weights(resumed), weights(module), rtol=0, atol=0)


@pytest.mark.slow
def test_half_the_batch_with_twice_the_accumulation_keeps_the_steps(tmp_path, walk, two_workers):
    """Batch 2 -> batch 1 with accumulate_grad_batches 2: the same global batch of 2, so the lr and the schedules
    stand; the epoch continues after the 10 clips taken, and, 37 starts making 37 batches of 1 (19 steps) where
    batches of 2 took 36 (18 steps), the epochs are a step longer."""
    root, before = two_workers
    _, after, trainer = fit(tmp_path, walk, workers=1, batch_size=1, accumulate=2, ckpt=root / "step=5.ckpt")
    assert [b[:2] for b in after] == [(0, i) for i in range(10, 37)] + [(1, i) for i in range(37)]
    epoch0 = clips(before[:5], 0) + clips(after, 0)
    assert len(epoch0) == len(set(epoch0)) == 37  # every start once
    assert trainer.global_step == 5 + 14 + 19  # the rest's 27 batches: 13 steps of 2 and a last of 1


@pytest.mark.slow
@pytest.mark.parametrize("name", [f"step={PER_EPOCH}.ckpt", "end-epoch=0.ckpt"])
def test_a_checkpoint_at_an_epochs_end_starts_the_next_epoch_on_the_new_layout(
    tmp_path, walk, two_workers, name
):
    """Written on epoch 0's last batch (18 of 18) or in its end hooks, and resumed where an epoch has 37 batches:
    epoch 1 starts, not batch 18 of a longer epoch 0."""
    root, _ = two_workers
    _, after, trainer = fit(tmp_path, walk, workers=1, batch_size=1, accumulate=2, ckpt=root / name)
    assert [b[:2] for b in after] == [(1, i) for i in range(37)]
    assert trainer.global_step == PER_EPOCH + 19


def test_another_global_batch_is_refused_in_one_line(tmp_path, walk, two_workers, capsys):
    root, _ = two_workers
    pl.seed_everything(0)
    data = make_data(walk, num_workers=1, batch_size=1)
    trainer = make_trainer(tmp_path, -1, max_epochs=EPOCHS)
    with pytest.raises(
        ValueError, match="global batch of 2 clips .* this run's is 1 .* --trainer.accumulate_grad_batches 2"
    ):
        trainer.fit(
            DoRAModule(**(MICRO | {"batch_size": 1})), datamodule=data, ckpt_path=str(root / "step=5.ckpt")
        )


@pytest.mark.slow
def test_dora_fit_resumes_a_two_process_run_on_one_process(tmp_path, capfd):
    """`dora fit` of 2 DDP processes (CPU, gloo), resumed by `--ckpt_path last` on one process with twice the batch:
    the notice, the steps continue; with the same batch: refused in one line, exit status 2; then back on 2
    processes."""
    root = tmp_path / "run"
    ddp = ["--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.use_distributed_sampler=false"]
    saver = {
        "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
        "init_args": {"every_n_train_steps": 3},
    }
    _, command, env = fit_command(root, 1, saver, *ddp, "--trainer.max_steps=3")
    run = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    (plan,) = [line for line in run.stderr.splitlines() if line.startswith("dora fit: plan: ")]  # process 0's
    assert "steps of 4 clips (2 x 2 processes x accumulate 1)" in plan
    assert "; 1 loader worker x 2 processes = 2 on this node's " in plan  # both processes' workers counted
    args, _, _ = fit_command(root, 1, saver, "--trainer.devices=1", "--ckpt_path=last")
    capfd.readouterr()
    with pytest.raises(SystemExit) as refused:
        main([*args, "--trainer.max_steps=6"])
    assert refused.value.code == 2
    (error,) = [line for line in capfd.readouterr().err.splitlines() if "error:" in line]
    assert "global batch of 4 clips (data.batch_size 2 x 2 processes x accumulate_grad_batches 1)" in error
    assert "keep 4 with --trainer.accumulate_grad_batches 2 or --data.batch_size 4" in error
    main([*args, "--trainer.max_steps=6", "--data.batch_size=4"])
    assert (
        "dora fit: resuming on another layout (2 processes x 1 worker x batch 2 -> 1 process"
        in capfd.readouterr().err
    )
    newest = find_last_checkpoint([root / "checkpoints"])
    assert torch.load(newest, weights_only=True)["global_step"] == 6
    # and back on 2 processes, mid-epoch again
    _, command, env = fit_command(root, 1, saver, *ddp, "--trainer.max_steps=9", "--ckpt_path=last")
    run = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "resuming on another layout (1 process x 1 worker x batch 4 -> 2 processes" in run.stderr
    newest = find_last_checkpoint([root / "checkpoints"])
    assert torch.load(newest, weights_only=True)["global_step"] == 9


@pytest.mark.slow
def test_no_loader_workers_and_one_worker_are_one_layout(tmp_path, walk, capfd):
    """``num_workers`` 0 (the main process loads) deals the clips as one worker does: a checkpoint of either resumes
    on the other exactly (the same batches, the same weights bit for bit), without the other-layout notice; also a
    checkpoint of an earlier version, which stored 0 as 0."""
    pl.seed_everything(0)
    straight, before, _ = fit(tmp_path / "a", walk, workers=1, save=True)
    saved = torch.load(tmp_path / "a" / "step=5.ckpt", weights_only=False)
    (data_key,) = [key for key, value in saved.items() if isinstance(value, dict) and "num_workers" in value]
    assert saved[data_key]["num_workers"] == 1
    saved[data_key]["num_workers"] = 0  # as an earlier version wrote a run without loader workers
    torch.save(saved, tmp_path / "zero.ckpt")
    for workers, ckpt in ((0, tmp_path / "a" / "step=5.ckpt"), (1, tmp_path / "zero.ckpt")):
        capfd.readouterr()
        resumed, after, _ = fit(tmp_path / f"b{workers}", walk, workers=workers, ckpt=ckpt)
        assert "another layout" not in capfd.readouterr().err
        assert after == before[5:]
        torch.testing.assert_close(weights(resumed), weights(straight), rtol=0, atol=0)
