"""`fit --ckpt_path` resumes exactly from a checkpoint written at any boundary: an epoch's end, an epoch's last batch,
mid-epoch and the first step give the weights of an uninterrupted run, after the right number of batches."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from conftest import write_video
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from test_module import MICRO, make_data, make_trainer

from dora_lightning.module import DoRAModule

EPOCHS, BATCHES = 3, 3  # the video below gives 3 batches of 2 clips an epoch


class BatchCounter(Callback):
    def __init__(self) -> None:
        self.batches: list[tuple[int, int, list]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.batches.append((trainer.current_epoch, batch_idx, batch["clip_index"].tolist()))


@pytest.fixture(scope="module")
def short_video(tmp_path_factory) -> Path:
    return write_video(tmp_path_factory.mktemp("resume") / "short.mp4", 9, width=96, height=64)


def weights(module: DoRAModule) -> torch.Tensor:
    parts = [p.detach().flatten() for p in (*module.student.parameters(), *module.teacher.parameters())]
    return torch.cat([*parts, module.center.flatten()])


def fit(
    root: Path, video: Path, by_steps: bool, ckpt: Path | None = None, callbacks=()
) -> tuple[DoRAModule, list]:
    counter = BatchCounter()
    limit = (
        dict(max_steps=EPOCHS * BATCHES, max_epochs=-1) if by_steps else dict(max_steps=-1, max_epochs=EPOCHS)
    )
    module = DoRAModule(**MICRO)
    trainer = make_trainer(
        root, **limit, enable_checkpointing=bool(callbacks), callbacks=[counter, *callbacks]
    )
    trainer.fit(module, datamodule=make_data(video), ckpt_path=str(ckpt) if ckpt else None)
    return module, counter.batches


@pytest.fixture(scope="module", params=["max_epochs", "max_steps"])
def straight(request, tmp_path_factory, short_video):
    """An uninterrupted run that writes a checkpoint after every step and at every epoch's end."""
    root = tmp_path_factory.mktemp(request.param)
    pl.seed_everything(0)
    savers = [
        ModelCheckpoint(dirpath=root, every_n_train_steps=1, save_top_k=-1, filename="{step}"),
        ModelCheckpoint(dirpath=root, every_n_epochs=1, save_top_k=-1, filename="end-{epoch}"),
    ]
    module, batches = fit(root, short_video, request.param == "max_steps", callbacks=savers)
    assert [b[:2] for b in batches] == [(e, b) for e in range(EPOCHS) for b in range(BATCHES)]
    return request.param == "max_steps", root, weights(module), batches


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, steps_done",
    [
        ("end-epoch=0.ckpt", BATCHES),  # (a) every_n_epochs=1, written at the epoch's end
        ("end-epoch=1.ckpt", 2 * BATCHES),
        ("step=3.ckpt", BATCHES),  # (b) a step checkpoint on an epoch's last batch
        ("step=6.ckpt", 2 * BATCHES),
        ("step=4.ckpt", BATCHES + 1),  # (c) mid-epoch
        ("step=1.ckpt", 1),  # (d) the first step
    ],
)
def test_resume_from_any_boundary_is_exact(tmp_path, short_video, straight, name, steps_done):
    by_steps, root, expected, straight_batches = straight
    pl.seed_everything(123)  # the checkpoint carries the RNG states
    resumed, batches = fit(tmp_path, short_video, by_steps, ckpt=root / name)
    check_resumed(resumed, batches, expected, straight_batches, steps_done)


def check_resumed(resumed, batches, expected, straight_batches, steps_done) -> None:
    assert resumed.global_step == EPOCHS * BATCHES
    assert batches == straight_batches[steps_done:]  # the same clips, in the same (epoch, batch) slots
    torch.testing.assert_close(weights(resumed), expected, rtol=0, atol=0)


@pytest.mark.slow
def test_end_of_epoch_checkpoint_of_an_older_version_resumes_exactly(tmp_path, short_video, straight):
    """Before this fix an end-of-epoch checkpoint saved the position (epoch, batches per epoch): still exact."""
    by_steps, root, expected, straight_batches = straight
    checkpoint = torch.load(root / "end-epoch=0.ckpt", weights_only=True)
    checkpoint["VideoClipDataModule"] |= {"epoch": 0, "batches_done": BATCHES}
    torch.save(checkpoint, tmp_path / "old.ckpt")
    pl.seed_everything(123)
    resumed, batches = fit(tmp_path, short_video, by_steps, ckpt=tmp_path / "old.ckpt")
    check_resumed(resumed, batches, expected, straight_batches, BATCHES)


class StopAfterStep(Callback):
    """Ends the run after optimiser step ``step`` the way Lightning's Timer (``trainer.max_time``), EarlyStopping or
    ``collapse_guard.stop`` do: ``trainer.should_stop``, so that the epoch's end hooks (and its checkpoint) run."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            trainer.should_stop = True


@pytest.mark.slow
def test_an_epoch_cut_short_by_a_stop_is_continued_not_skipped(tmp_path, short_video, straight):
    """A run stopped inside an epoch by ``trainer.should_stop`` (``--trainer.max_time``) writes its epoch-end
    checkpoint there; resuming it continues that epoch (up to commit dad890c the rest of the epoch was skipped, and
    on the last epoch the resumed run ended at once)."""
    by_steps, _, expected, straight_batches = straight  # with max_epochs, then with max_steps as the limit
    pl.seed_everything(0)
    saver = ModelCheckpoint(dirpath=tmp_path / "a", every_n_epochs=1, save_top_k=-1, filename="end-{epoch}")
    stopped, _ = fit(tmp_path / "a", short_video, by_steps, callbacks=[StopAfterStep(BATCHES + 1), saver])
    assert stopped.global_step == BATCHES + 1
    cut_short = (
        tmp_path / "a" / "end-epoch=1.ckpt"
    )  # written at the end hooks of epoch 1, after its first batch
    pl.seed_everything(123)
    resumed, batches = fit(tmp_path / "b", short_video, by_steps, ckpt=cut_short)
    check_resumed(resumed, batches, expected, straight_batches, BATCHES + 1)
