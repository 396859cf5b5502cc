"""RunPlan: the one line `dora fit` writes before its first step says what the run trains on and for how long, with
the run's own numbers."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import REPO
from test_cli import MICRO_ARGS
from test_module import MICRO, clip_video, make_data, make_trainer  # noqa: F401 - clip_video is a fixture

from dora_lightning.cli import main
from dora_lightning.module import DoRAModule
from dora_lightning.run_plan import RunPlan, format_duration


@pytest.mark.parametrize(
    "seconds, text", [(5, "5 s"), (128, "2 min 8 s"), (3600, "1 h 0 min"), (5530.4, "1 h 32 min")]
)
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


def plan_of(
    root, video, accumulate: int = 1, ckpt=None, augment_on: str = "auto", **trainer
) -> tuple[RunPlan, object]:
    plan = RunPlan()
    fit = make_trainer(
        root, trainer.pop("max_steps", -1), accumulate_grad_batches=accumulate, callbacks=[plan], **trainer
    )
    data = make_data(video, augment_on=augment_on)
    fit.fit(DoRAModule(**MICRO), datamodule=data, ckpt_path=ckpt)
    return plan, fit


def test_the_plan_has_the_runs_own_numbers(tmp_path, clip_video, capfd):  # noqa: F811
    plan, trainer = plan_of(tmp_path, clip_video, max_epochs=2)
    batches = trainer.num_training_batches  # per epoch; batch 2, one process
    starts = sum(trainer.datamodule.dataset.num_starts)
    base_lr = trainer.lightning_module.hparams.base_lr
    assert plan.line == (
        "DoRA, vit_tiny_patch16_224 at 32 px; 1 video, 4 s at 30 fps; "
        f"an epoch is {batches} steps of 2 clips (2 x 1 process x accumulate 1) = {2 * batches} of its {starts} clip "
        f"starts; the run: 2 epochs = {2 * batches} steps; lr {base_lr * 2 / 256:.3g} (base_lr {base_lr:g} x 2 / 256) after {batches} warm-up steps; views made in the loader workers (data.augment_on cpu); "
        "decoding in the training process (data.num_workers 0); no checkpoints (checkpointing is off)"
    )
    assert f"dora fit: plan: {plan.line}\n" in capfd.readouterr().err


def test_views_made_after_the_transfer_name_the_device(tmp_path, clip_video):  # noqa: F811
    plan, _ = plan_of(tmp_path, clip_video, augment_on="gpu", max_steps=1)
    assert "; views made on cpu after the transfer (data.augment_on gpu); " in plan.line


@pytest.mark.parametrize(("workers", "devices", "cores"), [(2, 1, 2), (3, 1, 2), (4, 2, 16)])
def test_the_loader_workers_are_counted_against_the_usable_cores(workers, devices, cores, monkeypatch):
    from types import SimpleNamespace

    import dora_lightning.run_plan as run_plan

    monkeypatch.setattr(run_plan.os, "sched_getaffinity", lambda pid: set(range(cores)))
    text = run_plan._loader(SimpleNamespace(num_devices=devices), SimpleNamespace(num_workers=workers))
    assert (
        text
        == {
            (2, 1, 2): "2 loader workers on this node's 2 usable CPU cores",
            (3, 1, 2): "3 loader workers on this node's 2 usable CPU cores (more workers than cores: lower "
            "data.num_workers)",
            (4, 2, 16): "4 loader workers x 2 processes = 8 on this node's 16 usable CPU cores",
        }[(workers, devices, cores)]
    )


def test_accumulation_steps_and_a_resumed_run(tmp_path, clip_video):  # noqa: F811
    plan, trainer = plan_of(tmp_path, clip_video, accumulate=2, max_steps=2, enable_checkpointing=True)
    assert re.search(r"an epoch is \d+ steps of 4 clips \(2 x 1 process x accumulate 2\)", plan.line)
    assert (
        "the run: 2 steps (trainer.max_steps)" in plan.line
        and " x 4 / 256) after 2 warm-up steps" in plan.line
    )
    assert f"checkpoints in {tmp_path / 'checkpoints'}" in plan.line and "continuing" not in plan.line
    last = sorted((tmp_path / "checkpoints").glob("*.ckpt"))[-1]
    checkpoint = torch.load(last, weights_only=True)
    assert checkpoint["dora"]["planned_steps"] == 2
    checkpoint["dora"]["planned_steps"] = 3  # a run planned for 3 steps, stopped after 2
    torch.save(checkpoint, tmp_path / "planned_3.ckpt")
    resumed, _ = plan_of(
        tmp_path / "b", clip_video, accumulate=2, max_steps=3, ckpt=str(tmp_path / "planned_3.ckpt")
    )
    assert resumed.line.endswith(
        "continuing after step 2"
    )  # the same length: the schedules go on as they were
    longer, trainer = plan_of(tmp_path / "c", clip_video, accumulate=2, max_steps=4, ckpt=str(last))
    module = trainer.lightning_module
    before, now = module.schedule_values(2, 2)["lr"], module.schedule_values(2)["lr"]
    assert before != now
    assert longer.line.endswith(
        "continuing after step 2 (its checkpoint's run was planned for 2 steps, this one for 4: the lr, weight decay, "
        f"EMA momentum and teacher temperature schedules span the new length; lr at step 2 {before:.3g} -> {now:.3g})"
    )


def test_dora_fit_writes_the_plan_and_it_can_be_turned_off(tmp_path, capfd):
    args = ["fit", *MICRO_ARGS, f"--data.paths={REPO / 'assets/video/vtest.mp4'}", "--trainer.max_steps=1"]
    main([*args, f"--trainer.default_root_dir={tmp_path / 'a'}"])
    (line,) = [line for line in capfd.readouterr().err.splitlines() if line.startswith("dora fit: plan: ")]
    assert "1 video, " in line and "the run: 1 step (trainer.max_steps)" in line
    assert f"checkpoints in {tmp_path / 'a'}" in line
    main([*args, f"--trainer.default_root_dir={tmp_path / 'b'}", "--run_plan.enabled=false"])
    assert "dora fit: plan:" not in capfd.readouterr().err
