"""A damaged file is named once for all loader workers and epochs; its counts still come every epoch."""

from __future__ import annotations

import multiprocessing
import subprocess
import sys
import textwrap
import warnings

from conftest import BUNDLED_VIDEO, REPO

from dora_lightning.data.decode_stats import DecodeStats, WarnedOnce


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
