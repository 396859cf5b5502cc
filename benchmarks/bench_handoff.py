"""Hand-off benchmark: what batching a worker's clips and moving them to the training process costs, alone.

Each worker of a 2-worker torch DataLoader yields the same paper-scale clip sample over and over (uint8 views: one
global 8 x 3 x 224 x 224, six local 8 x 3 x 112 x 112, three integers; no decoding, no augmentation), so the loader's
whole cost is the collate, the transfer between processes and the training process's receipt. Three ways are timed:

* ``default_collate``: torch's default, one shared-memory file per tensor (what the loader did before session 11);
* ``collate_clips``: one shared-memory file per batch (``dora_lightning.data.collate``);
* ``recycled``: ``collate_clips`` into blocks the workers reuse once the training process has freed the batch
  (``RecycledBlocks``; what ``VideoClipDataModule`` uses when it does not pin memory).

Reported per way (median over ``--rounds`` interleaved rounds, each in a fresh DataLoader): CPU milliseconds per clip in
the workers (from /proc/PID/stat) and in the training process, and clips/s. The CPU time is the number to compare:
in the real loader the workers are CPU-bound, so every millisecond saved here is a millisecond of decoding and
augmentation gained.

Usage::

    python benchmarks/bench_handoff.py --out bench_out/bench_handoff.json     # make bench
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info  # noqa: E402

from benchmarks.common import (  # noqa: E402
    add_quiet_wait_arg,
    base_machine_info,
    markdown_table,
    wait_for_quiet,
    write_json,
)
from benchmarks.data_cases import BUSY_CORES  # noqa: E402
from dora_lightning.data.collate import RecycledBlocks, collate_clips  # noqa: E402

WAYS = ("default_collate", "collate_clips", "recycled")


class RepeatedClip(IterableDataset):
    """One fixed paper-scale clip sample per worker, endlessly."""

    def __init__(self, clip_length: int, local_crops: int) -> None:
        self.clip_length, self.local_crops = clip_length, local_crops

    def __iter__(self):
        generator = torch.Generator().manual_seed(get_worker_info().id)

        def views(size: int) -> torch.Tensor:
            shape = (self.clip_length, 3, size, size)
            return torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator)

        sample = {
            "global_views": [views(224)],
            "local_views": [views(112) for _ in range(self.local_crops)],
            "video": 0,
            "start": 0,
            "decoded_frames": 1,
        }
        while True:
            yield sample


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(way: str, args: argparse.Namespace) -> dict:
    """Time ``args.batches`` batches of one way after ``args.warmup`` batches."""
    dataset = RepeatedClip(args.clip_length, args.local_crops)
    options = dict(batch_size=args.batch_size, num_workers=args.workers)
    if way == "recycled":
        blocks = RecycledBlocks(args.workers)
        inner = iter(DataLoader(dataset, collate_fn=blocks.collate, **options))
        batches = blocks.batches(inner)
    else:
        collate = default_collate if way == "default_collate" else collate_clips
        inner = batches = iter(DataLoader(dataset, collate_fn=collate, **options))
    for _ in range(args.warmup):
        next(batches)
    pids = [worker.pid for worker in inner._workers]
    workers0, main0, t0 = sum(map(_cpu_seconds, pids)), time.process_time(), time.perf_counter()
    for _ in range(args.batches):
        batch = next(batches)
    wall = time.perf_counter() - t0
    workers = sum(map(_cpu_seconds, pids)) - workers0
    main = time.process_time() - main0
    del batch, batches, inner
    clips = args.batches * args.batch_size
    return {
        "way": way,
        "clips_per_s": clips / wall,
        "worker_cpu_ms_per_clip": 1e3 * workers / clips,
        "main_cpu_ms_per_clip": 1e3 * main / clips,
        "total_cpu_ms_per_clip": 1e3 * (workers + main) / clips,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=6)
    parser.add_argument("--clip-length", type=int, default=8)
    parser.add_argument("--local-crops", type=int, default=6)
    parser.add_argument("--batches", type=int, default=300, help="timed batches per round and way")
    parser.add_argument("--warmup", type=int, default=10, help="batches before timing")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds; the median is reported")
    add_quiet_wait_arg(parser, default=30)
    args = parser.parse_args(argv)
    if (
        min(args.workers, args.batch_size, args.clip_length, args.batches, args.rounds) < 1
        or min(args.warmup, args.local_crops) < 0
    ):
        parser.error(
            "--workers, --batch-size, --clip-length, --batches, --rounds must be >= 1, --warmup, --local-crops >= 0"
        )
    started = dt.datetime.now(dt.timezone.utc)
    waited, load = wait_for_quiet(args.quiet_wait, BUSY_CORES, include_children=True)
    runs = {way: [] for way in WAYS}
    for round_ in range(args.rounds):
        for way in WAYS:
            result = measure(way, args)
            runs[way].append(result)
            print(
                f"round {round_ + 1} {way}: {result['clips_per_s']:.0f} clips/s, CPU per clip "
                f"{result['worker_cpu_ms_per_clip']:.2f} ms workers + {result['main_cpu_ms_per_clip']:.2f} ms main",
                flush=True,
            )
    keys = ("clips_per_s", "worker_cpu_ms_per_clip", "main_cpu_ms_per_clip", "total_cpu_ms_per_clip")
    medians = {way: {k: round(statistics.median(r[k] for r in runs[way]), 3) for k in keys} for way in WAYS}
    table = markdown_table(
        ["hand-off", "workers' CPU ms / clip", "training process CPU ms / clip", "total", "clips/s"],
        [
            [
                way,
                f"{m['worker_cpu_ms_per_clip']:.2f}",
                f"{m['main_cpu_ms_per_clip']:.2f}",
                f"{m['total_cpu_ms_per_clip']:.2f}",
                f"{m['clips_per_s']:.0f}",
            ]
            for way, m in medians.items()
        ],
    )
    print(f"\n{table}\n\nmedian of {args.rounds} interleaved rounds; date {started:%Y-%m-%d %H:%M} UTC")
    payload = {
        "date_utc": started.isoformat(timespec="seconds"),
        "machine": {**base_machine_info(), "torch": torch.__version__},
        "settings": vars(args) | {"out": str(args.out) if args.out else None},
        "quiet_wait_s": waited,
        "other_cpu_load_before": load,
        "median": medians,
        "runs": runs,
    }
    if args.out is not None:
        write_json(args.out, payload)
    return payload


if __name__ == "__main__":
    main()
