"""Resuming an epoch on another layout: what it costs and what the epoch's clips become (plans only, no decoding).

A Walking Tours run (configs/wt.yaml's data settings: clips of 8 frames 60 apart, batch 16 per process, 8 workers,
32 cursors, start_step 4) is stopped mid-epoch and resumed on another layout with the same global batch:

* ``8gpu_to_4gpu``: 8 processes -> 4 processes with accumulate_grad_batches 2 (a smaller spot instance);
* ``8workers_to_4``: one process, 8 loader workers -> 4 (a machine with fewer cores).

For a 2 h video at 60 fps and for 23 h in 10 videos (WT-all's length), each stopped at 40 % of the epoch, it reports
the time a process spends at the resume replaying the checkpoint's plans (``consumed_starts``: once per process,
before its workers start) and a worker's plan for the rest (``plan_shard`` with the taken starts left out); and,
over the whole epoch (the part before the stop, then the rest), clip starts taken twice and never taken, against an
uninterrupted epoch's never-taken count and against the simple alternative of skipping the same number of batches
of the new layout's own plans (what a resume that keeps only the position would do).

Usage::

    python benchmarks/bench_resume_layout.py --out bench_out/bench_resume_layout.json     # make bench
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import yaml  # noqa: E402

from benchmarks.common import REPO_ROOT, add_report_args, finish_report, markdown_table  # noqa: E402
from dora_lightning.data.epoch_rest import (  # noqa: E402
    Layout,
    Segment,
    batches_taken,
    consumed_starts,
    continue_epoch,
    rest_batches_available,
)
from dora_lightning.data.sampling import ClipSpec  # noqa: E402

SEED, EPOCH, STOPPED_AT = 0, 3, 0.4
VIDEOS = {"2h": [2 * 3600 * 60], "23h_in_10": [int(2.3 * 3600 * 60)] * 10}


def data_settings() -> dict:
    return yaml.safe_load((REPO_ROOT / "configs" / "wt.yaml").read_text())["data"]


def taken_positions(num_starts, spec, layout, per_process, start_step, exclude=None, skip=0) -> np.ndarray:
    """Axis positions of the clips ``layout`` emits when each process takes batches ``skip`` to ``per_process`` of
    its plans (from the starts not ``exclude``d)."""
    bases = np.concatenate([[0], np.cumsum(num_starts)[:-1]])
    shards = range(layout.num_shards)
    plans = layout.plans(
        num_starts, spec, shards, start_step=start_step, seed=SEED, epoch=EPOCH, exclude=exclude
    )
    out = []
    for shard, plan in enumerate(plans):
        logical = shard % layout.num_workers
        begin = batches_taken(skip, layout.num_workers, logical) * layout.batch_size
        end = batches_taken(per_process, layout.num_workers, logical) * layout.batch_size
        out.append(bases[plan.videos[begin:end]] + plan.starts[begin:end])
    return np.concatenate(out)


def epoch_counts(total: int, *parts: np.ndarray) -> dict:
    """Starts taken twice or more, and never, over the parts of one epoch."""
    uses = np.bincount(np.concatenate(parts), minlength=total)
    return {"taken_twice": int(np.count_nonzero(uses > 1)), "never_taken": int(np.count_nonzero(uses == 0))}


def case(frames: list[int], before: Layout, after: Layout, accumulate: int) -> dict:
    data = data_settings()
    spec, start_step = ClipSpec(data["clip_length"], data["frame_stride"]), data["start_step"]
    num_starts = [spec.num_starts(f) for f in frames]
    total = sum(num_starts)
    per_epoch_before = len(taken_positions(num_starts, spec, before, 10**12, start_step)) // (
        before.batch_size * before.world_size
    )
    stopped = int(per_epoch_before * STOPPED_AT)
    first = taken_positions(num_starts, spec, before, stopped, start_step)

    started = time.perf_counter()
    taken = consumed_starts(
        num_starts, spec, [Segment(before, stopped)], start_step=start_step, seed=SEED, epoch=EPOCH
    )
    replay_s = time.perf_counter() - started
    started = time.perf_counter()
    after.plans(num_starts, spec, [0], start_step=start_step, seed=SEED, epoch=EPOCH, exclude=taken)
    rest_plan_s = time.perf_counter() - started

    per_epoch_after = len(taken_positions(num_starts, spec, after, 10**12, start_step)) // (
        after.batch_size * after.world_size
    )
    available = rest_batches_available(num_starts, taken, after)
    done, left = continue_epoch(len(first), available, per_epoch_after, after, accumulate)
    rest = taken_positions(num_starts, spec, after, left, start_step, exclude=taken)
    naive = taken_positions(num_starts, spec, after, per_epoch_after, start_step, skip=done)
    whole = taken_positions(num_starts, spec, before, per_epoch_before, start_step)
    return {
        "starts": total,
        "before": before.describe(),
        "after": after.describe() + f" x accumulate {accumulate}",
        "stopped_at_batch": stopped,
        "batches_per_epoch": [per_epoch_before, per_epoch_after],
        "resumed_at_batch": done,
        "replay_s": round(replay_s, 3),
        "rest_plan_s": round(rest_plan_s, 3),
        "taken_mask_mb": round(taken.nbytes / 2**20, 2),
        "uninterrupted": epoch_counts(total, whole),
        "rest_of_the_epoch": epoch_counts(total, first, rest),
        "skip_batches_of_new_plans": epoch_counts(total, first, naive),
    }


def fmt_table(cases: dict) -> str:
    header = [
        "case",
        "starts",
        "stop -> resume batch",
        "replay (s)",
        "rest plan (s)",
        "twice / never: uninterrupted",
        "rest of the epoch (ours)",
        "skip batches of new plans",
    ]
    rows = []
    for name, c in cases.items():
        pair = lambda d: f"{d['taken_twice']} / {d['never_taken']}"  # noqa: E731
        rows.append(
            [
                name,
                str(c["starts"]),
                f"{c['stopped_at_batch']} -> {c['resumed_at_batch']}",
                f"{c['replay_s']:.2f}",
                f"{c['rest_plan_s']:.2f}",
                pair(c["uninterrupted"]),
                pair(c["rest_of_the_epoch"]),
                pair(c["skip_batches_of_new_plans"]),
            ]
        )
    return markdown_table(header, rows)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_report_args(p, quick="a 10-minute video only")
    args = p.parse_args(argv)
    started = dt.datetime.now(dt.timezone.utc)
    data = data_settings()
    batch, workers = data["batch_size"], data["num_workers"]
    cursors = data.get("cursors") or 2 * batch
    layouts = {
        "8gpu_to_4gpu": (Layout(8, workers, batch, cursors), Layout(4, workers, batch, cursors), 2),
        "8workers_to_4": (Layout(1, workers, batch, cursors), Layout(1, workers // 2, batch, cursors), 1),
    }
    videos = {"10min": [10 * 60 * 60]} if args.quick else VIDEOS
    cases = {
        f"{video}/{name}": case(frames, before, after, accumulate)
        for video, frames in videos.items()
        for name, (before, after, accumulate) in layouts.items()
    }
    return finish_report(started, fmt_table(cases), args.out, cases=cases)


if __name__ == "__main__":
    main()
