"""The training step's wiring with a real Lightning Trainer and a micro ViT on CPU (synthetic, already normalised clips).

Each test covers one point where DoRAModule hands a value to Lightning, the optimiser, the teacher or the tracker:
gradient clipping, lr / weight-decay schedules, the last-layer freeze, the EMA on real optimiser steps, the
``official_compat`` switch, per-rank head draws (and their resume), and float32 logits under bf16 autocast.
"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from conftest import MICRO_MODULE
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader

import dora_lightning.core.tracker as tracker_file
import dora_lightning.module as module_file
from dora_lightning.core.schedules import cosine_schedule
from dora_lightning.module import DoRAModule, per_parameter_clip_

MICRO = MICRO_MODULE | dict(batch_size=2, drop_path_rate=0.0, warmup_epochs=1)


def synthetic_batches(count: int, clips: int = 2, frames: int = 2, seed: int = 0) -> list[dict]:
    """``count`` batches as VideoClipDataModule hands them over (normalised float views, one global, two local)."""
    generator = torch.Generator().manual_seed(seed)
    return [
        {
            "global_views": [torch.randn(clips, frames, 3, 32, 32, generator=generator)],
            "local_views": [torch.randn(clips, frames, 3, 16, 16, generator=generator) for _ in range(2)],
        }
        for _ in range(count)
    ]


def loader(count: int) -> DataLoader:
    return DataLoader(synthetic_batches(count), batch_size=None)


def fit(module: DoRAModule, root: Path, batches: int, ckpt_path: str | None = None, **kw) -> pl.Trainer:
    options = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(root),
    )
    trainer = pl.Trainer(**(options | kw))
    trainer.fit(module, train_dataloaders=loader(batches), ckpt_path=ckpt_path)
    return trainer


def vector(params) -> torch.Tensor:
    return torch.cat([p.detach().flatten().clone() for p in params])


# ----------------------------------------------------------------- gradient clipping
def test_per_parameter_clip_scales_large_gradients_down_and_never_up():
    small, large, absent = (
        nn.Parameter(torch.zeros(3)),
        nn.Parameter(torch.zeros(4)),
        nn.Parameter(torch.zeros(2)),
    )
    small.grad = torch.tensor([0.3, 0.0, 0.4])  # norm 0.5
    large.grad = torch.tensor([30.0, 0.0, 0.0, 40.0])  # norm 50
    per_parameter_clip_([small, large, absent], 3.0)
    assert torch.equal(small.grad, torch.tensor([0.3, 0.0, 0.4])), "a gradient under the clip was rescaled"
    torch.testing.assert_close(large.grad.norm(), torch.tensor(3.0))
    torch.testing.assert_close(large.grad / large.grad.norm(), torch.tensor([0.6, 0.0, 0.0, 0.8]))
    assert absent.grad is None


def test_per_parameter_clip_equals_the_one_parameter_at_a_time_loop():
    """The multi-tensor clip gives DINO's loop's gradients exactly, for float32 and bfloat16 gradients mixed."""
    generator = torch.Generator().manual_seed(0)
    shapes = [(384, 384), (384,), (1,), (65536, 16), (3, 16, 16)] * 3
    params = [
        nn.Parameter(torch.zeros(s, dtype=torch.bfloat16 if i % 4 == 3 else torch.float32))
        for i, s in enumerate(shapes)
    ]
    for i, p in enumerate(params):
        p.grad = (torch.randn(p.shape, generator=generator) * 10.0 ** (i % 5 - 2)).to(p.dtype)
    expected = []
    for p in params:
        norm = p.grad.norm(2)
        expected.append(p.grad * torch.clamp(3.0 / (norm + 1e-6), max=1.0))
    per_parameter_clip_(params, 3.0)
    assert all(torch.equal(p.grad, e) for p, e in zip(params, expected, strict=True))
    assert any(not torch.equal(e, torch.zeros_like(e)) and e.norm() < 3.0 for e in expected)


class GradientSpy(Callback):
    """Plants a small and a large gradient before clipping; records every gradient before clipping and at the step."""

    def __init__(self, clip: float) -> None:
        self.clip, self.before, self.at_step = clip, [], []

    def on_train_start(self, trainer, pl_module) -> None:
        self.module = pl_module
        trainer.optimizers[0].register_step_post_hook(self._after_step)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        backbone = pl_module.student.backbone
        for param, norm in (
            (backbone.pos_embed, self.clip / 4),
            (backbone.patch_embed.proj.weight, self.clip * 10),
        ):
            param.grad.mul_(norm / param.grad.norm())
        self.before.append(self._grads(pl_module))

    def _after_step(self, optimizer, args, kwargs) -> None:
        self.at_step.append(self._grads(self.module))

    @staticmethod
    def _grads(module: DoRAModule) -> dict[str, torch.Tensor]:
        return {n: p.grad.clone() for n, p in module.student.named_parameters() if p.grad is not None}


def test_fit_clips_each_gradient_before_the_optimiser_step(tmp_path):
    pl.seed_everything(0)
    module = DoRAModule(**(MICRO | {"clip_grad": 0.5, "freeze_last_layer_epochs": 0}))
    spy = GradientSpy(clip=0.5)
    fit(module, tmp_path, 2, max_steps=2, callbacks=[spy])
    assert len(spy.before) == len(spy.at_step) == 2
    for before, at_step in zip(spy.before, spy.at_step, strict=True):
        assert before.keys() == at_step.keys()
        small, large = before["backbone.pos_embed"], before["backbone.patch_embed.proj.weight"]
        assert torch.equal(at_step["backbone.pos_embed"], small), "a small gradient was changed"
        torch.testing.assert_close(at_step["backbone.patch_embed.proj.weight"].norm(), torch.tensor(0.5))
        torch.testing.assert_close(at_step["backbone.patch_embed.proj.weight"], large * (0.5 / large.norm()))
        for name, grad in at_step.items():
            expected = before[name] * min(1.0, 0.5 / (before[name].norm().item() + 1e-6))
            torch.testing.assert_close(grad, expected, msg=name)


# ----------------------------------------------------------------- lr and weight decay
class ParamGroupSpy(Callback):
    def __init__(self) -> None:
        self.groups: list[list[tuple[float, float]]] = []

    def on_train_start(self, trainer, pl_module) -> None:
        optimizer = trainer.optimizers[0]
        optimizer.register_step_post_hook(
            lambda opt, args, kwargs: self.groups.append(
                [(g["lr"], g["weight_decay"]) for g in opt.param_groups]
            )
        )


def test_schedules_reach_the_optimiser_param_groups(tmp_path):
    """2 steps per epoch x 3 epochs, 1 warm-up epoch: lr warms up over steps 0-1, then follows the cosine."""
    pl.seed_everything(0)
    hp = dict(
        base_lr=0.0256, min_lr=1e-5, weight_decay=0.04, weight_decay_end=0.4, freeze_last_layer_epochs=0
    )
    module = DoRAModule(**(MICRO | hp))
    spy = ParamGroupSpy()
    fit(module, tmp_path, 2, max_epochs=3, callbacks=[spy])
    peak = 0.0256 * 2 / 256  # base_lr x (2 clips x 1 process x 1 accumulation) / 256
    assert len(spy.groups) == 6
    lrs = [groups[0][0] for groups in spy.groups]
    assert lrs[0] == 0.0 and lrs[1] == pytest.approx(peak) and lrs[2] == pytest.approx(peak)
    assert lrs[2] > lrs[3] > lrs[4] > lrs[5] > 1e-5
    for step, groups in enumerate(spy.groups):
        lr = cosine_schedule(step, 6, peak, 1e-5, warmup_steps=2)
        wd = cosine_schedule(step, 6, 0.04, 0.4)
        assert groups[0] == pytest.approx((lr, wd), rel=1e-12), step
        assert groups[1] == pytest.approx((lr, 0.0), rel=1e-12), step  # biases and norms: no weight decay
        assert groups[0][0] == pytest.approx(module.schedule_values(step)["lr"], rel=1e-12)
    optimizer = module.optimizers().optimizer
    decay, no_decay = optimizer.param_groups[0]["params"], optimizer.param_groups[1]["params"]
    assert all(p.ndim >= 2 for p in decay) and all(p.ndim <= 1 for p in no_decay)
    names = {id(p): n for n, p in module.student.named_parameters()}
    assert {n for n in map(names.get, map(id, no_decay)) if n.endswith(".bias")} == {
        n for n, p in module.student.named_parameters() if n.endswith(".bias")
    }


# ----------------------------------------------------------------- last-layer freeze
class Snapshots(Callback):
    """Student and teacher parameters before training and after every batch."""

    def __init__(self) -> None:
        self.last_layer, self.rest, self.teacher, self.student = [], [], [], []

    def _take(self, module: DoRAModule) -> None:
        last = {id(p) for p in module.student.head.last_layer.parameters()}
        self.last_layer.append(vector(module.student.head.last_layer.parameters()))
        self.rest.append(vector(p for p in module.student.parameters() if id(p) not in last))
        self.teacher.append(vector(module.teacher.parameters()))
        self.student.append(vector(module.student.parameters()))

    def on_train_start(self, trainer, pl_module) -> None:
        self._take(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._take(pl_module)


def test_last_layer_is_frozen_for_the_first_epoch_only(tmp_path):
    pl.seed_everything(0)
    module = DoRAModule(**(MICRO | {"freeze_last_layer_epochs": 1, "base_lr": 0.0256, "warmup_epochs": 0}))
    snaps = Snapshots()
    fit(module, tmp_path, 2, max_epochs=2, callbacks=[snaps])  # 2 steps per epoch
    assert len(snaps.last_layer) == 5
    for step in (1, 2):  # epoch 0
        assert torch.equal(snaps.last_layer[step], snaps.last_layer[0]), (
            f"last layer moved at step {step - 1}"
        )
        assert not torch.equal(snaps.rest[step], snaps.rest[step - 1]), f"the rest froze at step {step - 1}"
    for step in (3, 4):  # epoch 1
        assert not torch.equal(snaps.last_layer[step], snaps.last_layer[step - 1]), (
            f"still frozen at {step - 1}"
        )


# ----------------------------------------------------------------- EMA
def test_ema_follows_real_optimiser_steps_only(tmp_path):
    """Accumulating 2 batches: the teacher moves after batches 1 and 3 only, by t <- m t + (1 - m) s."""
    pl.seed_everything(0)
    module = DoRAModule(**(MICRO | {"momentum_teacher": 0.9, "momentum_teacher_end": 1.0}))
    snaps = Snapshots()
    fit(module, tmp_path, 4, max_steps=2, accumulate_grad_batches=2, callbacks=[snaps])
    teacher, student = snaps.teacher, snaps.student  # index 0: before training; i + 1: after batch i
    assert len(teacher) == 5
    assert torch.equal(teacher[1], teacher[0]), "the teacher moved on an accumulation-only batch"
    assert torch.equal(teacher[3], teacher[2]), "the teacher moved on an accumulation-only batch"
    # momentum schedule over the 2 optimiser steps: cosine from 0.9 to 1.0 -> 0.9 at step 0, 0.95 at step 1
    torch.testing.assert_close(teacher[2], 0.9 * teacher[1] + 0.1 * student[2], rtol=0, atol=1e-6)
    torch.testing.assert_close(teacher[4], 0.95 * teacher[3] + 0.05 * student[4], rtol=0, atol=1e-6)
    assert not torch.equal(teacher[4], teacher[3])


# ----------------------------------------------------------------- official_compat
@pytest.mark.parametrize("official", [True, False])
def test_official_compat_reaches_tracker_and_loss(monkeypatch, official):
    seen = {}
    track, loss = tracker_file.track_objects, module_file.dora_loss

    def track_spy(*args, **kwargs):
        seen["tracker"] = kwargs
        return track(*args, **kwargs)

    def loss_spy(*args):
        seen["loss_official"] = args[-1]
        return loss(*args)

    monkeypatch.setattr(tracker_file, "track_objects", track_spy)  # what TrackingOptions.track calls
    monkeypatch.setattr(module_file, "dora_loss", loss_spy)
    torch.manual_seed(0)
    module = DoRAModule(**(MICRO | {"official_compat": official}))
    module.compute_loss(synthetic_batches(1)[0], teacher_temp=0.04)
    assert seen["tracker"]["threshold"] == ("batch" if official else "per_sample")
    assert seen["tracker"]["log_domain_sinkhorn"] is (not official)
    assert seen["loss_official"] is official


# ----------------------------------------------------------------- fp32 logits under bf16
@pytest.mark.parametrize("method", ["dora", "dino"])
def test_logits_reach_the_loss_in_fp32_under_bf16_autocast(monkeypatch, method):
    dtypes = []
    name = f"{method}_loss"
    original = getattr(module_file, name)

    def spy(teacher, student_a, student_b, *rest):
        dtypes.append((teacher.dtype, student_a.dtype, student_b.dtype))
        return original(teacher, student_a, student_b, *rest)

    monkeypatch.setattr(module_file, name, spy)
    torch.manual_seed(0)
    module = DoRAModule(**(MICRO | {"method": method}))
    batch = synthetic_batches(1)[0]
    if method == "dino":
        batch["global_views"].append(batch["global_views"][0].flip(-1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        parts, _, _ = module.compute_loss(batch, teacher_temp=0.04)
    assert dtypes == [(torch.float32,) * 3]
    assert parts.total.dtype == torch.float32


# ----------------------------------------------------------------- per-rank head draws
def heads_of_a_run(root: Path, rank: int, batches: int = 4, ckpt_path: str | None = None, **kw) -> list:
    """The heads each training step hands the tracker, in a run whose module believes it is process ``rank``."""
    heads: list[list[int]] = []
    track = tracker_file.track_objects

    def spy(inputs, drawn, *args, **kwargs):
        heads.append(drawn.tolist())
        return track(inputs, drawn, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(DoRAModule, "global_rank", property(lambda self: rank))
        patch.setattr(tracker_file, "track_objects", spy)
        module = DoRAModule(**(MICRO | {"num_objects": 2, "seed": 7}))
        fit(module, root, batches, ckpt_path=ckpt_path, max_steps=batches, **kw)
    return heads


@pytest.fixture(scope="module")
def rank_runs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("ranks")
    saver = ModelCheckpoint(dirpath=root / "r0", every_n_train_steps=2, save_top_k=-1, filename="{step}")
    pl.seed_everything(0)
    runs = {"r0": heads_of_a_run(root / "r0", 0, enable_checkpointing=True, callbacks=[saver])}
    pl.seed_everything(123)  # the global RNG plays no part in the head draws
    runs["r0_again"] = heads_of_a_run(root / "again", 0)
    runs["r1"] = heads_of_a_run(root / "r1", 1)
    runs["ckpt"] = str(root / "r0" / "step=2.ckpt")  # written by rank 0, as in DDP
    return runs


def test_each_rank_draws_its_own_heads(rank_runs):
    assert len(rank_runs["r0"]) == len(rank_runs["r1"]) == 4
    assert rank_runs["r0"] == rank_runs["r0_again"], "rank 0's draws are not reproducible"
    assert rank_runs["r0"] != rank_runs["r1"], "ranks 0 and 1 drew the same heads"
    assert len({tuple(h) for h in rank_runs["r0"]}) > 1, "one head pair for every step"


@pytest.mark.parametrize("rank", [0, 1])
def test_resume_from_rank_zero_checkpoint_continues_each_ranks_heads(tmp_path, rank_runs, rank):
    resumed = heads_of_a_run(tmp_path, rank, ckpt_path=rank_runs["ckpt"])
    assert resumed == rank_runs[f"r{rank}"][2:]


def test_head_draw_seeds_are_distinct():
    from dora_lightning.core.tracker import head_seed

    seeds = {head_seed(0, rank, draw) for rank in range(8) for draw in range(1000)}
    assert len(seeds) == 8000 and all(0 <= s < 2**63 for s in seeds)
    assert head_seed(0, 1, 5) == head_seed(1, 0, 5)  # per-process stream = seed + rank, as the released code
