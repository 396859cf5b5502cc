"""What reading an interlaced video's first field costs, against reading its whole frames (both fields).

A generated 1080i file (H.264, top field first, 25 fps, 60 frames of a moving noise texture) is read by the training
reader (``RangeReader``) at the decode size of ``configs/wt.yaml``'s data (short side 320: 568 x 320), to RGBA arrays
and to compact YUV frames, with ``first_field`` on (the default: each interlaced frame is its first displayed field)
and off (the whole frame). Reported: milliseconds per frame, decoding and conversion together, best of 3.

Usage::

    python benchmarks/bench_interlaced.py --out bench_out/bench_interlaced.json     # make bench
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import av  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.common import add_report_args, finish_report, markdown_table  # noqa: E402
from dora_lightning.data.decode_stats import DecodeStats  # noqa: E402
from dora_lightning.data.reader import RangeReader  # noqa: E402
from dora_lightning.data.sources import probe_videos  # noqa: E402


def write_1080i(path: Path, frames: int) -> Path:
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 1920, 1080, "yuv420p"
        stream.codec_context.options = {
            "flags": "+ilme+ildct",
            "x264-params": "interlaced=1:tff=1",
            "crf": "20",
            "preset": "veryfast",
        }
        texture = np.random.default_rng(0).integers(0, 255, (1080, 1920, 3), dtype=np.uint8)
        for t in range(frames):
            image = av.VideoFrame.from_ndarray(np.roll(texture, 8 * t, axis=1), format="rgb24")
            for packet in stream.encode(image):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def ms_per_frame(path: Path, first_field: bool, compact: bool, rounds: int) -> float:
    (info,) = probe_videos([str(path)], min_frames=1)
    best = float("inf")
    for _ in range(rounds):
        reader = RangeReader(
            info,
            0,
            info.num_frames,
            (568, 320),
            lambda i: True,
            DecodeStats(),
            pixel_format="rgba",
            compact=compact,
            first_field=first_field,
        )
        started = time.perf_counter()
        count = sum(1 for _ in reader)
        best = min(best, (time.perf_counter() - started) / count * 1000)
    return best


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_report_args(p, quick="8 frames, one round")
    args = p.parse_args(argv)
    started = dt.datetime.now(dt.timezone.utc)
    frames, rounds = (8, 1) if args.quick else (60, 3)
    with tempfile.TemporaryDirectory() as folder:
        path = write_1080i(Path(folder) / "1080i.mp4", frames)
        cases = {
            f"{'first_field' if first else 'whole_frame'}/{'compact' if compact else 'rgba'}": round(
                ms_per_frame(path, first, compact, rounds), 2
            )
            for compact in (False, True)
            for first in (True, False)
        }
    table = markdown_table(["case", "ms per frame"], [[k, f"{v:.2f}"] for k, v in cases.items()])
    return finish_report(started, table, args.out, ms_per_frame=cases)


if __name__ == "__main__":
    main()
