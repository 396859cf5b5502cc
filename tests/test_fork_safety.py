"""Loader workers are forked: what the training process leaves behind must not hang them."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from conftest import BUNDLED_VIDEO, REPO

# The training process leaves a decoder with threads as garbage (a reader abandoned in a reference cycle; the garbage
# collector is off, as between two automatic collections), then iterates ClipLoader with a worker that collects
# garbage when it starts. Freeing that decoder in the worker, where its threads do not exist, hangs the worker forever.
SCRIPT = textwrap.dedent(
    f"""
    import gc
    import av
    from dora_lightning.data.datamodule import VideoClipDataModule

    def abandon_a_threaded_decoder():
        container = av.open({str(BUNDLED_VIDEO)!r})
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        stream.codec_context.thread_count = 4
        frames = container.decode(stream)
        for _ in range(5):
            next(frames)
        cycle = {{"container": container, "frames": frames}}
        cycle["cycle"] = cycle

    dm = VideoClipDataModule(paths=[{str(BUNDLED_VIDEO)!r}], clip_length=2, frame_stride=4, decode_short_side=32,
                             batch_size=4, num_workers=1, pin_memory=False)
    dm.setup("fit")
    loader = dm.train_dataloader()
    loader.worker_init_fn = lambda worker_id: gc.collect()
    gc.disable()
    abandon_a_threaded_decoder()
    batch = next(iter(loader))
    print("batch", sorted(batch))
    """
)


def test_garbage_decoder_threads_do_not_hang_a_loader_worker():
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("batch"), proc.stdout
