"""bench_gpu.py's parts that run a ``pl.Trainer`` (its child side, :mod:`benchmarks.gpu_cases`): Lightning's overhead
over the bare step on one synthetic batch, and ``dora fit`` with the real loader on a generated video."""

from __future__ import annotations

import statistics
import tempfile
import time
from typing import Any

import lightning.pytorch as pl
import torch

from benchmarks.common import wt_settings
from benchmarks.gpu_cases import (
    Probe,
    build_module,
    clock,
    peak_gib,
    sync_device,
    synthetic_batch,
    time_bare,
)


class _Marks(pl.Callback):
    """Records when chosen training batches start (optimiser-step numbers ``timed``) and profiles ``profiled``."""

    def __init__(self, device: Any, timed: range, profiled: range, wall: bool = False) -> None:
        self.device, self.timed, self.profiled = device, timed, profiled
        self.clock = time.perf_counter if wall else lambda: clock(device)
        self.times: dict[int, float] = {}
        self.profile = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        step = trainer.global_step
        if step in (0, self.timed.start, self.timed.stop):
            sync_device(self.device)
            self.times[step] = self.clock()
        if step == self.profiled.start and len(self.profiled):
            self.profile = Probe(self.device).__enter__()
        if step == self.profiled.stop and self.profile is not None:
            sync_device(self.device)
            self.profile.__exit__(None, None, None)


class _Repeat:
    """An iterable of ``length`` references to one batch (a loader that costs nothing)."""

    def __init__(self, batch: dict, length: int) -> None:
        self.batch, self.length = batch, length

    def __len__(self) -> int:
        return self.length

    def __iter__(self):
        return (self.batch for _ in range(self.length))


def _trainer(case: dict, steps: int, callbacks: list, root: str, **extra) -> pl.Trainer:
    from lightning.pytorch.loggers import TensorBoardLogger

    return pl.Trainer(
        accelerator="gpu" if case["device"].startswith("cuda") else "cpu",
        devices=1,
        precision=case["precision"],
        max_steps=steps,
        logger=TensorBoardLogger(root, name="bench"),
        log_every_n_steps=case.get("log_every_n_steps", 50),
        enable_checkpointing=False,
        enable_progress_bar=case.get("progress_bar", True),
        enable_model_summary=False,
        callbacks=callbacks,
        default_root_dir=root,
        **extra,
    )


def run_overhead(case: dict) -> dict:
    """Lightning's cost: the bare step vs ``Trainer.fit`` on the same synthetic batch (already on the device, so only
    the Trainer, the module's training_step hooks, logging and the progress bar differ); wall time and host syncs per
    step, each from the same number of steps after the same warm-up."""

    method, device = case.get("method", "dora"), torch.device(case["device"])
    bare = time_bare(case, method)
    torch.manual_seed(0)
    module = build_module(case | {"model": case.get("model", {}) | {"method": method}})
    w, s = case["warmup"], case["steps"]
    batch = synthetic_batch(case, method, device)
    p = case["profiled_steps"]
    marks = _Marks(device, range(w, w + s), range(w + s, w + s + p))
    with tempfile.TemporaryDirectory() as root:
        _trainer(case, w + s + p + 1, [marks], root).fit(
            module, train_dataloaders=_Repeat(batch, w + s + p + 1)
        )
    per_step = (marks.times[w + s] - marks.times[w]) / s
    fit = {"step_ms": round(per_step * 1e3, 2), **marks.profile.summary(p)}
    return {
        "bare": bare,
        "trainer": fit,
        "overhead_pct": round(100 * (fit["step_ms"] / bare["step_ms"] - 1), 1),
    }


def _counting_datamodule(base: type) -> type:
    """``base`` (VideoClipDataModule) that also records each batch's decoded frames (``decoded_frames``, summed over
    its clips) as the batch reaches the training loop, one entry per step, before the batch moves to the device: a
    CPU tensor, so reading it waits for nothing."""

    class CountingDataModule(base):
        decoded: list[int]

        def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
            frames = batch.get("decoded_frames") if isinstance(batch, dict) else None
            self.decoded.append(int(torch.as_tensor(frames).sum()) if frames is not None else -1)
            return super().on_before_batch_transfer(batch, dataloader_idx)

    return CountingDataModule


def _per_clip(decoded: list[int], steps: range, batch_size: int) -> float | None:
    counts = decoded[steps.start : steps.stop]
    if not counts or min(counts) < 0:
        return None
    return round(sum(counts) / (len(counts) * batch_size), 1)


def run_fit(case: dict) -> dict:
    """``dora fit`` on ``case["video"]`` with wt.yaml's data pipeline (real decoding workers) at the case's batch
    size: steps/s, clips/s, data-wait fraction (time the loop waited in the loader's next(), from Lightning's simple
    profiler, over the training batch time) and peak memory, over ``steps`` steps after ``warmup`` steps.

    Steady state, not the loader's start-up: a decode cursor's first clip costs a seek plus about span + GOP / 2
    decoded frames (445 at wt.yaml's 8 frames 60 apart on a 2 s GOP), each later clip about ``start_step`` (4). So
    bench_gpu.py passes ``data.cursors`` = batch_size (every worker's first batch starts all of its cursors, its
    later batches are cheap) and ``warmup`` >= workers + 1 (step k's batch is worker k mod workers', so the first
    ``workers`` steps are the first batches). ``decoded_frames_per_clip`` shows it: about span + GOP / 2 in the
    warm-up, about ``start_step`` in the timed steps. ``to_first_step_s`` and ``warmup_s`` are the start-up's wall
    time (process set-up, index, forking the workers, their first batches)."""
    from lightning.pytorch.profilers import SimpleProfiler

    from dora_lightning.data.augment.multicrop import ClipMultiCrop
    from dora_lightning.data.datamodule import VideoClipDataModule

    device = torch.device(case["device"])
    _, data, transform = wt_settings()
    data |= {"paths": case["video"], "batch_size": case["batch_size"], "num_workers": case["workers"]}
    data |= case.get("data", {})
    transform |= case.get("transform", {})
    torch.manual_seed(0)
    module = build_module(case)
    datamodule = _counting_datamodule(VideoClipDataModule)(**data, transform=ClipMultiCrop(**transform))
    datamodule.decoded = []
    w, s = case["warmup"], case["steps"]
    marks = _Marks(device, range(w, w + s), range(0, 0), wall=True)  # waiting for data counts
    with tempfile.TemporaryDirectory() as root:
        profiler = SimpleProfiler(dirpath=root, filename="profile")
        # one step more than timed: the timed window ends when step w + s starts, not after fit() returns (which
        # would add the workers' shutdown and the Trainer's teardown to the last step)
        trainer = _trainer(case, w + s + 1, [marks], root, profiler=profiler, max_epochs=-1)
        t0 = time.perf_counter()
        trainer.fit(module, datamodule=datamodule)
        sync_device(device)
        wall = time.perf_counter() - t0
    durations = profiler.recorded_durations
    fetch = [d for k, v in durations.items() if k.endswith("train_dataloader_next") for d in v][w : w + s]
    batch = [d for k, v in durations.items() if k.endswith("run_training_batch") for d in v][w : w + s]
    per_step = (marks.times[w + s] - marks.times[w]) / s
    wait = sum(fetch) / max(sum(fetch) + sum(batch), 1e-9)
    return {
        "batch_size": case["batch_size"],
        "workers": case["workers"],
        "cursors": datamodule.cursors,
        "augment_on": data.get("augment_on", "auto"),
        "warmup_steps": w,
        "timed_steps": s,
        "steps_per_s": round(1 / per_step, 3),
        "clips_per_s": round(case["batch_size"] / per_step, 2),
        "data_wait_fraction": round(wait, 3),
        "loader_next_ms_mean": round(1e3 * statistics.fmean(fetch), 2) if fetch else None,
        "training_batch_ms_mean": round(1e3 * statistics.fmean(batch), 2) if batch else None,
        "decoded_frames_per_clip": {
            "warmup": _per_clip(datamodule.decoded, range(0, w), case["batch_size"]),
            "timed": _per_clip(datamodule.decoded, range(w, w + s), case["batch_size"]),
        },
        "to_first_step_s": round(marks.times[0] - t0, 1),
        "warmup_s": round(marks.times[w] - marks.times[0], 1),
        "peak_gib": peak_gib(device),
        "fit_wall_s": round(wall, 1),
    }
