"""A damaged file is named once for all loader workers and epochs; its counts still come every epoch, in a Lightning run
(which never asks a loader past its length) too, and in a multi-process run once, from process 0, with the counts of
all processes (each decodes only its share of the clips)."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import BUNDLED_VIDEO, REPO
from lightning.pytorch import LightningModule
from test_ddp import free_port
from test_module import make_trainer
from video_fixtures import corrupt_middle

import dora_lightning.data.loader as loader_module
from dora_lightning.data.augment.multicrop import ClipMultiCrop
from dora_lightning.data.datamodule import VideoClipDataModule
from dora_lightning.data.decode_stats import DecodeStats, WarnedOnce
from dora_lightning.data.reader import RangeReader
from dora_lightning.data.sources import probe_video


def _ask(warned: WarnedOnce, answers) -> None:
    for _ in range(5):
        answers.put(warned.first("a.mp4", "missing"))


def test_first_is_true_once_across_processes():
    context = multiprocessing.get_context("fork")
    warned, answers = WarnedOnce(["a.mp4", "b.mp4"], context), context.SimpleQueue()
    workers = [context.Process(target=_ask, args=(warned, answers)) for _ in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
    results = [answers.get() for _ in range(15)]
    assert results.count(True) == 1
    assert warned.first("a.mp4", "decode") and warned.first("b.mp4", "missing")
    assert not warned.first("b.mp4", "missing")
    assert warned.first("elsewhere.mp4", "missing") and warned.first("elsewhere.mp4", "missing")


def test_epochs_and_workers_sharing_a_record_warn_once():
    shared = WarnedOnce(["a.mp4"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):  # three workers or epochs, each with its own counters
            stats = DecodeStats(shared=shared)
            stats.warn_once("a.mp4", "missing", "a.mp4 line")
            stats.warn_once("a.mp4", "missing", "a.mp4 line")
            stats.missing_frames += 2
            assert ("a.mp4", "missing") in stats.warned  # the epoch's summary still names the file
        alone = [DecodeStats(), DecodeStats()]
        for stats in alone:
            stats.warn_once("a.mp4", "missing", "unshared line")
    lines = [str(w.message) for w in caught]
    assert lines.count("a.mp4 line") == 1 and lines.count("unshared line") == 2


# Every clip a worker decodes "meets" a problem in its file; 2 workers x 2 epochs x 2 files. Warnings in forked
# workers go to their stderr, so the loader runs in a child process whose stderr is read.
SCRIPT = textwrap.dedent(
    f"""
    import shutil, tempfile, warnings
    from pathlib import Path
    from dora_lightning.data.datamodule import VideoClipDataModule
    from dora_lightning.data.stream import VideoClipStream

    warnings.simplefilter("always")
    folder = Path(tempfile.mkdtemp())
    paths = [str(shutil.copy({str(BUNDLED_VIDEO)!r}, folder / name)) for name in ("one.mp4", "two.mp4")]
    gather = VideoClipStream._gather

    def gather_and_complain(self, state, start, stats):
        path = self.videos[state.run.video].path
        stats.warn_once(path, "missing", f"problem in {{Path(path).name}}")
        return gather(self, state, start, stats)

    VideoClipStream._gather = gather_and_complain
    dm = VideoClipDataModule(paths=paths, clip_length=2, frame_stride=4, decode_short_side=32, batch_size=4,
                             num_workers=2, pin_memory=False, index_cache=str(folder / "index"))
    dm.setup("fit")
    loader = dm.train_dataloader()
    for epoch in range(2):
        loader.dataset.set_position(epoch, 0)
        print("epoch", epoch, sum(1 for _ in loader), flush=True)
    """
)


def test_a_loaders_workers_name_a_file_once_per_run():
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=REPO, capture_output=True, text=True, timeout=180
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("epoch") == 2
    for name in ("one.mp4", "two.mp4"):
        assert proc.stderr.count(f"problem in {name}") == 1, proc.stderr[-3000:]


def damaged_count(line: str) -> int:
    """The count of a "'<file>': N damaged frames ..." line."""
    return int(line.split("': ")[1].split(" damaged")[0])


def data_module(video: str, index_cache: str, workers: int) -> VideoClipDataModule:
    """The damaged video's clips at a small size."""
    return VideoClipDataModule(
        paths=[video],
        clip_length=3,
        frame_stride=4,
        decode_short_side=32,
        batch_size=4,
        num_workers=workers,
        start_step=2,
        transform=ClipMultiCrop(global_size=16, local_size=8, num_local_crops=1, pre_crop_size=24),
        pin_memory=False,
        index_cache=index_cache,
    )


class Consumer(LightningModule):
    """Takes the batches, trains nothing of note."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self.weight.square().sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_trainer_fit_says_each_epochs_damage(tmp_path: Path) -> None:
    """Before, the lines were said when the loader ran out, which Lightning never makes it do: silent in `dora fit`."""
    fixture = corrupt_middle(tmp_path)
    trainer = make_trainer(tmp_path, -1, max_epochs=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(Consumer(), datamodule=data_module(str(fixture.path), str(tmp_path / "index"), workers=1))
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    damage = [m for m in messages if "damaged frames could not be decoded" in m]
    assert len(damage) == 2 and all(str(fixture.path) in m for m in damage), messages
    assert ["skipped in epoch 0 " in damage[0], "skipped in epoch 1 " in damage[1]] == [True, True]
    assert len([m for m in messages if m.startswith("clip stream:")]) == 2
    # each damaged frame counts once, however many reads of the epoch met it (the clips' reads met these 184 times)
    info = probe_video(str(fixture.path), str(tmp_path / "index"))
    reader = RangeReader(info, 0, info.num_frames, (info.width, info.height), lambda i: True, DecodeStats())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sum(1 for _ in reader)
    assert 0 < damaged_count(damage[0]) <= len(reader.damaged) < info.num_frames


def one_process(rank: int, port: int, video: str, index_cache: str, out: dict) -> None:
    """One process of a 2-process gloo group: one epoch of the data module (1 loader worker); what it warned, and the
    damaged frames of its own share (read where the loader hands its reports on)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    own = []
    gather = loader_module.reports_of_all_processes

    def recorded(reports, world_size):
        own.extend(reports)
        return gather(reports, world_size)

    loader_module.reports_of_all_processes = recorded
    try:
        dm = data_module(video, index_cache, workers=1)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            dm.setup("fit")
            loader = dm.train_dataloader()
            batches = sum(1 for _ in loader)
        messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
        out[rank] = {
            "batches": batches,
            "own_damaged": {
                index for report in own for indices in report["damaged_frames"].values() for index in indices
            },
            "own_replaced": sum(report["substituted_clips"] for report in own),
            "damage_lines": [m for m in messages if "damaged frames could not be decoded" in m],
            "summaries": [m for m in messages if m.startswith("clip stream:")],
        }
    finally:
        dist.destroy_process_group()


def test_process_zero_reports_the_damage_of_all_processes(tmp_path: Path) -> None:
    fixture = corrupt_middle(tmp_path)
    out = mp.Manager().dict()
    args = (free_port(), str(fixture.path), str(tmp_path / "index"), out)
    mp.spawn(one_process, args=args, nprocs=2, join=True)
    first, second = out[0], out[1]
    assert first["batches"] == second["batches"] > 0
    assert first["own_replaced"] > 0 and second["own_replaced"] > 0  # both shares meet the damage
    (line,) = first["damage_lines"]
    assert damaged_count(line) == len(first["own_damaged"] | second["own_damaged"])
    (summary,) = first["summaries"]
    replaced = first["own_replaced"] + second["own_replaced"]
    assert f"{damaged_count(line)} damaged frames, 0 missing frames, {replaced} clips replaced" in summary
    assert second["damage_lines"] == second["summaries"] == []


def test_without_a_process_group_the_reports_stay_local() -> None:
    reports = [{"damaged_frames": {"a.mp4": [7, 8]}}]
    assert loader_module.reports_of_all_processes(reports, world_size=2) is reports
