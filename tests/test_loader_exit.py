"""A process that ends while a loader iterator still has its workers (a failure whose traceback holds the iterator,
or a script that ends with one) exits: the workers ignore SIGTERM, so multiprocessing's exit handler, which sends
SIGTERM and then waits, waited forever (the process hung after its traceback)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from conftest import REPO

SCRIPT = textwrap.dedent(
    """
    from dora_lightning.data.datamodule import VideoClipDataModule

    data = VideoClipDataModule(paths="assets/video/vtest.mp4", clip_length=2, frame_stride=5, decode_short_side=48,
                               batch_size=2, num_workers=2, start_step=5, transform=None)
    data.setup("fit")
    batches = iter(data.train_dataloader())
    next(batches)
    print("a batch", flush=True)
    raise RuntimeError("failed with the loader's workers running")
    """
)


def test_a_failure_with_loader_workers_running_still_exits():
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=REPO, capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 1, done.stderr[-2000:]
    assert (
        "a batch" in done.stdout and "RuntimeError: failed with the loader's workers running" in done.stderr
    )
