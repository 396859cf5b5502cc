"""DoRAModule with a micro ViT on a generated video: training runs, resume is exact, bad settings fail clearly."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from conftest import MICRO_MODULE, write_video
from lightning.pytorch.callbacks import ModelCheckpoint

from dora_lightning.data.augment.multicrop import ClipMultiCrop
from dora_lightning.data.datamodule import VideoClipDataModule
from dora_lightning.module import DoRAModule, NonFiniteLossError

MICRO = MICRO_MODULE | dict(
    out_dim=128, head_hidden_dim=64, head_bottleneck_dim=32, warmup_epochs=1, batch_size=2
)


@pytest.fixture(scope="module")
def clip_video(tmp_path_factory) -> Path:
    return write_video(tmp_path_factory.mktemp("train") / "walk.mp4", 120, width=96, height=64)


def make_data(
    video: Path, num_global: int = 1, global_size: int = 32, local_size: int = 16, **kw
) -> VideoClipDataModule:
    transform = ClipMultiCrop(
        global_size=global_size,
        local_size=local_size,
        num_global_crops=num_global,
        num_local_crops=2,
        pre_crop_size=48,
    )
    options = dict(clip_length=2, frame_stride=3, decode_short_side=64, batch_size=2, num_workers=0) | kw
    return VideoClipDataModule(paths=str(video), start_step=3, transform=transform, **options)


def make_trainer(root: Path, max_steps: int, **kw) -> pl.Trainer:
    options = dict(
        accelerator="cpu",
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(root),
    )
    return pl.Trainer(**(options | kw))


def student_vector(module: DoRAModule) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in module.student.parameters()])


def test_dora_trains_and_updates_teacher(tmp_path, clip_video):
    pl.seed_everything(0)
    module = DoRAModule(**MICRO)
    teacher_before = torch.cat([p.detach().flatten().clone() for p in module.teacher.parameters()])
    make_trainer(tmp_path, 3).fit(module, datamodule=make_data(clip_video))
    teacher_after = torch.cat([p.detach().flatten() for p in module.teacher.parameters()])
    assert module.global_step == 3
    assert not torch.equal(teacher_before, teacher_after), "EMA never moved the teacher"
    assert not any(p.requires_grad for p in module.teacher.parameters())
    assert module.center.abs().sum() > 0, "centre never updated"


def test_ema_steps_only_with_the_optimiser(tmp_path, clip_video, monkeypatch):
    """With gradient accumulation 2, 4 batches give 2 optimiser steps and exactly 2 EMA updates."""
    import dora_lightning.module as module_file

    momenta = []
    original = module_file.ema_update_
    monkeypatch.setattr(module_file, "ema_update_", lambda t, s, m: (momenta.append(m), original(t, s, m)))
    pl.seed_everything(0)
    module = DoRAModule(**MICRO)
    batches = []
    module.on_train_batch_start = lambda batch, batch_idx: batches.append(batch_idx)
    make_trainer(tmp_path, 2, accumulate_grad_batches=2).fit(module, datamodule=make_data(clip_video))
    assert batches == [0, 1, 2, 3]
    assert len(momenta) == 2 and momenta[0] == pytest.approx(0.996)


def test_dino_baseline_trains(tmp_path, clip_video):
    pl.seed_everything(0)
    module = DoRAModule(**(MICRO | {"method": "dino"}))
    make_trainer(tmp_path, 2).fit(module, datamodule=make_data(clip_video, num_global=2))
    assert module.global_step == 2


def test_bf16_mixed_on_cpu(tmp_path, clip_video):
    pl.seed_everything(0)
    module = DoRAModule(**MICRO)
    losses = []
    original = module.compute_loss

    def spy(batch, temp):
        parts, teacher, tracked = original(batch, temp)
        losses.append(parts.total)
        return parts, teacher, tracked

    module.compute_loss = spy
    make_trainer(tmp_path, 2, precision="bf16-mixed").fit(module, datamodule=make_data(clip_video))
    assert all(loss.dtype == torch.float32 and torch.isfinite(loss) for loss in losses)


def test_resume_is_exact(tmp_path, clip_video):
    """6 steps straight == resume from the step-3 checkpoint (weights, centre, data order, head draws, drop path)."""
    pl.seed_everything(0)
    straight = DoRAModule(**MICRO)
    saver = ModelCheckpoint(dirpath=tmp_path / "a", every_n_train_steps=3, save_top_k=-1, filename="{step}")
    make_trainer(tmp_path / "a", 6, enable_checkpointing=True, callbacks=[saver]).fit(
        straight, datamodule=make_data(clip_video)
    )
    ckpt = tmp_path / "a" / "step=3.ckpt"  # written mid-epoch, as after a crash or preemption

    pl.seed_everything(123)  # a different global seed must not matter: the checkpoint carries the RNG states
    resumed = DoRAModule(**MICRO)
    make_trainer(tmp_path / "c", 6).fit(resumed, datamodule=make_data(clip_video), ckpt_path=str(ckpt))
    assert resumed.global_step == 6
    torch.testing.assert_close(student_vector(resumed), student_vector(straight), rtol=0, atol=0)
    torch.testing.assert_close(resumed.center, straight.center, rtol=0, atol=0)


def test_too_many_objects_is_a_config_error():
    with pytest.raises(ValueError, match="num_objects=4 must be between 1 and the 3 heads"):
        DoRAModule(**(MICRO | {"num_objects": 4}))


@pytest.mark.parametrize("kind, sizes", [("global", {"global_size": 36}), ("local", {"local_size": 20})])
def test_crop_not_divisible_by_patch(tmp_path, clip_video, kind, sizes):
    module = DoRAModule(**MICRO)
    size = next(iter(sizes.values()))
    with pytest.raises(
        ValueError, match=f"data.transform.init_args.{kind}_size={size} is not a multiple of the patch size 8"
    ):
        make_trainer(tmp_path, 1).fit(module, datamodule=make_data(clip_video, **sizes))


def test_dino_needs_two_global_views(tmp_path, clip_video):
    module = DoRAModule(**(MICRO | {"method": "dino"}))
    with pytest.raises(ValueError, match="num_global_crops: 2"):
        make_trainer(tmp_path, 1).fit(module, datamodule=make_data(clip_video))


def test_unnormalised_uint8_views_are_refused(tmp_path, clip_video):
    """The loader alone hands over uint8 views; a Trainer fed the bare dataloader gets a clear error."""
    module = DoRAModule(**MICRO)
    data = make_data(clip_video)
    data.setup("fit")
    with pytest.raises(ValueError, match="uint8 views that were never normalised"):
        make_trainer(tmp_path, 1).fit(module, train_dataloaders=data.train_dataloader())


def test_non_finite_loss_names_the_step(tmp_path, clip_video):
    module = DoRAModule(**MICRO)
    original = module.compute_loss

    def poisoned(batch, temp):
        parts, teacher, tracked = original(batch, temp)
        if module.global_step == 1:
            parts.total = parts.total * float("nan")
        return parts, teacher, tracked

    module.compute_loss = poisoned
    with pytest.raises(NonFiniteLossError, match="at step 1"):
        make_trainer(tmp_path, 3).fit(module, datamodule=make_data(clip_video))


def test_foreign_checkpoint_is_refused(tmp_path, clip_video):
    bad = tmp_path / "other.ckpt"
    module = DoRAModule(**MICRO)
    torch.save(
        {
            "state_dict": module.state_dict(),
            "epoch": 0,
            "global_step": 0,
            "pytorch-lightning_version": "2.6.6",
        },
        bad,
    )
    with pytest.raises(ValueError, match="not written by `dora fit`"):
        make_trainer(tmp_path, 1).fit(module, datamodule=make_data(clip_video), ckpt_path=str(bad))


def test_tracks_and_attention_go_to_tensorboard(tmp_path, clip_video):
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    pl.seed_everything(0)
    module = DoRAModule(**(MICRO | {"log_images_every_n_steps": 2}))
    logger = TensorBoardLogger(str(tmp_path), name="tb")
    make_trainer(tmp_path, 3, logger=logger, log_every_n_steps=1).fit(
        module, datamodule=make_data(clip_video)
    )
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0})
    events.Reload()
    tags = events.Tags()
    assert {"tracker/object_tracks", "attention/frame0_heads"} <= set(tags["images"])
    assert [e.step for e in events.Images("tracker/object_tracks")] == [0, 2]
    track = events.Images("tracker/object_tracks")[0]
    assert (track.width, track.height) == (2 + 2 * 34, 2 + 4 * 34)  # T=2 columns, frames + k=3 object rows
    assert {"train/loss", "train/teacher_entropy", "tracker/mask_area_obj0", "train/lr"} <= set(
        tags["scalars"]
    )


# ----------------------------------------------------------------- nothing per step waits for the device (issue 15)
class _HostWaits(torch.utils._python_dispatch.TorchDispatchMode):
    """Records, by the calling file, reads of tensor values into Python and numbers turned into tensors: on a GPU
    both wait for the device (a read of a device tensor; a blocking host-to-device copy)."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []
        self.numbers: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        import traceback

        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.lift_fresh.default):
            stack = traceback.extract_stack()[:-1]
            caller = next(
                f for f in reversed(stack) if "/torch/" not in f.filename and "test_module" not in f.filename
            )
            bucket = self.reads if func is torch.ops.aten._local_scalar_dense.default else self.numbers
            bucket.append(f"{caller.filename}:{caller.name}")
        return func(*args, **(kwargs or {}))


class _Window(pl.Callback):
    """Enters a _HostWaits for training batches [start, stop)."""

    def __init__(self, start: int, stop: int) -> None:
        self.start, self.stop, self.mode = start, stop, _HostWaits()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.start:
            self.mode.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == self.stop - 1:
            self.mode.__exit__(None, None, None)


def test_training_steps_read_nothing_back_from_the_device(tmp_path, clip_video):
    """Between diagnostics steps the module neither reads a tensor's value (the finiteness check goes through
    LossWatch) nor logs Python numbers (each would be a blocking host-to-device copy inside self.log)."""
    from lightning.pytorch.loggers import TensorBoardLogger

    generator = torch.Generator().manual_seed(0)
    batch = {  # normalised views as the data module hands them over (no decoding inside the recorded window)
        "global_views": [torch.randn(2, 2, 3, 32, 32, generator=generator)],
        "local_views": [torch.randn(2, 2, 3, 16, 16, generator=generator) for _ in range(2)],
    }
    window = _Window(1, 4)
    module = DoRAModule(**(MICRO | {"diagnostics_every_n_steps": 10}))
    logger = TensorBoardLogger(str(tmp_path), name="tb")
    trainer = make_trainer(tmp_path, 5, logger=logger, log_every_n_steps=10, callbacks=[window])
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader([batch] * 5, batch_size=None))
    assert [f for f in window.mode.reads if "dora_lightning" in f] == []
    assert [f for f in window.mode.numbers if f.endswith("__to_tensor")] == []  # no Python number to self.log


def test_schedules_are_evaluated_once_per_step(tmp_path, clip_video):
    module = DoRAModule(**MICRO)
    calls: list[int] = []
    original = module.schedule_values
    module.schedule_values = lambda step: calls.append(step) or original(step)
    make_trainer(tmp_path, 3).fit(module, datamodule=make_data(clip_video))
    assert calls == [0, 1, 2]


def test_diagnostics_every_n_steps(tmp_path, clip_video):
    from lightning.pytorch.loggers import CSVLogger

    module = DoRAModule(**(MICRO | {"diagnostics_every_n_steps": 2}))
    logger = CSVLogger(str(tmp_path), name="csv")
    make_trainer(tmp_path, 5, logger=logger, log_every_n_steps=1).fit(
        module, datamodule=make_data(clip_video)
    )
    import csv

    rows = list(csv.DictReader(open(Path(logger.log_dir) / "metrics.csv")))
    lr_steps = [int(r["step"]) for r in rows if r.get("train/lr")]
    area_steps = [int(r["step"]) for r in rows if r.get("tracker/mask_area_obj0")]
    assert lr_steps == area_steps == [0, 2, 4]
    assert all(
        0.0 <= float(r["tracker/mask_area_obj0"]) <= 1.0 for r in rows if r.get("tracker/mask_area_obj0")
    )
    assert len([r for r in rows if r.get("train/loss")]) == 5  # the losses: every step
    with pytest.raises(ValueError, match="diagnostics_every_n_steps must be >= 0"):
        DoRAModule(**(MICRO | {"diagnostics_every_n_steps": -1}))


def test_loss_watch_hands_back_cpu_losses_in_order():
    from dora_lightning.loss_watch import LossWatch

    watch = LossWatch()
    watch.push(4, 0, torch.tensor(2.5))
    watch.push(5, 1, torch.tensor(float("inf")))
    first, second = watch.ready()
    assert (first.step, first.epoch, first.value, first.finite) == (4, 0, 2.5, True)
    assert first.loss.device.type == "cpu" and first.loss.ndim == 0 and float(first.loss) == 2.5
    assert (second.step, second.epoch, second.finite) == (5, 1, False)
    assert watch.ready(wait=True) == []


@pytest.mark.slow
def test_compile_trains_like_eager_with_the_same_parameter_names(tmp_path, clip_video):
    """model.compile: blocks and heads compiled in place (the teacher's hooked last block stays eager): the same
    state_dict keys and, after 2 steps, the same weights up to float rounding."""
    weights = {}
    for compiled in (False, True):
        pl.seed_everything(0)
        module = DoRAModule(**MICRO, compile=compiled)
        make_trainer(tmp_path / str(compiled), 2).fit(module, datamodule=make_data(clip_video))
        weights[compiled] = module.state_dict()
        if compiled:
            assert module.student.backbone.blocks[0]._compiled_call_impl is not None
            assert module.teacher.backbone.blocks[-1]._compiled_call_impl is None
    assert list(weights[True]) == list(weights[False])
    for key, value in weights[False].items():
        torch.testing.assert_close(weights[True][key], value, rtol=1e-4, atol=1e-5, msg=key)
