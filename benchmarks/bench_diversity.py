"""Batch diversity of the clip stream versus uniform random draws (spec G.4: "Batch diversity is binding").

A DataLoader batch comes from ONE worker, so a streaming loader can put near-copies of one moment into a batch; the
official loader draws every clip independently and uniformly (DistributedSampler over all starts). Two parts:

* **Plan** (index arithmetic over the real epoch plan, :func:`dora_lightning.data.sampling.plan_shard`, no decoding):
  ``configs/wt.yaml`` at 8 GPUs x 8 workers on a 90-min 60 fps video (324000 frames), and ``configs/demo.yaml`` on the
  bundled video (795 frames at 10 fps) at its batch of 8 and at batch 32. Per case, over every batch of every shard
  of ``--epochs`` epochs: distinct moments per batch (starts grouped wherever consecutive ones are at most one clip
  span apart: :func:`~dora_lightning.data.sampling.distinct_moments`; median, minimum), the mean pairwise time gap of
  a batch's clips (mean over batches), and the distinct moments among 10 consecutive batches of one rank (the rank's
  batch n comes from worker n mod workers; every window of every rank). The same statistics for uniform draws: each
  rank's batches cut from a seeded permutation of all starts (the official sampler), same seeds and batch counts.
* **Decode**: the demo settings through ``VideoClipDataModule`` with 2 worker processes on the bundled video (a small
  multi-crop, to be quick): each emitted batch's ``clip_index`` must equal the plan's clips (batch n from worker
  n mod 2), and the distinct moments and decoded frames per clip of the emitted batches are reported.

Usage::

    python benchmarks/bench_diversity.py --out bench_out/bench_diversity.json     # make bench
    python benchmarks/bench_diversity.py --quick --out /tmp/div.json              # smoke run (fewer batches)
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import time
from pathlib import Path

import numpy as np
import yaml

# run as a script (python benchmarks/bench_diversity.py): make the `benchmarks` package importable
if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import REPO_ROOT, add_report_args, finish_report, markdown_table  # noqa: E402
from dora_lightning.data.sampling import (  # noqa: E402
    ClipSpec,
    cursors_per_worker,
    distinct_moments,
    mean_pairwise_gap,
    plan_shard,
)

BUNDLED_VIDEO = REPO_ROOT / "assets" / "video" / "vtest.mp4"
PHOTO_WALK_FRAMES = 1280  # assets/video/photo_walk.mp4, configs/demo.yaml's video
WINDOW = 10  # consecutive batches of one rank


def data_config(name: str) -> dict:
    """The ``data:`` section of ``configs/<name>.yaml``."""
    return yaml.safe_load((REPO_ROOT / "configs" / f"{name}.yaml").read_text())["data"]


def _stats(moments: list[int], gaps: list[float], windows: list[int]) -> dict:
    return {
        "batches": len(moments),
        "moments_median": float(np.median(moments)),
        "moments_min": int(np.min(moments)),
        "moments_mean": round(float(np.mean(moments)), 3),
        "gap_mean": round(float(np.nanmean(gaps)), 1),
        "window_median": float(np.median(windows)) if windows else None,
        "window_min": int(np.min(windows)) if windows else None,
    }


def _window_moments(rank_batches: list[tuple[np.ndarray, np.ndarray]], span: int) -> list[int]:
    out = []
    for i in range(len(rank_batches) - WINDOW + 1):
        videos = np.concatenate([v for v, _ in rank_batches[i : i + WINDOW]])
        starts = np.concatenate([s for _, s in rank_batches[i : i + WINDOW]])
        out.append(distinct_moments(videos, starts, span))
    return out


def plan_case(
    num_frames: list[int],
    spec: ClipSpec,
    *,
    world: int,
    workers: int,
    batch: int,
    cursors: int | None,
    start_step: int,
    seed: int,
    epochs: int,
    max_batches: int | None,
    measured_ranks: int | None = None,
) -> dict:
    """Diversity statistics of the plan and of uniform draws over the same starts (see the module docstring)."""
    num_starts = [spec.num_starts(n) for n in num_frames]
    bases = np.concatenate([[0], np.cumsum(num_starts)[:-1]])
    total = sum(num_starts)
    cursors = cursors_per_worker(cursors, batch)
    ours: dict[str, list] = {"m": [], "g": [], "w": []}
    uniform: dict[str, list] = {"m": [], "g": [], "w": []}
    t0 = time.perf_counter()
    for epoch in range(epochs):
        rng = np.random.default_rng([seed, epoch])
        order = rng.permutation(
            total
        )  # the official sampler: one permutation per epoch, split over the ranks
        for rank in range(world if measured_ranks is None else min(world, measured_ranks)):
            plans = [
                plan_shard(
                    num_starts,
                    spec,
                    shard=rank * workers + w,
                    num_shards=world * workers,
                    workers_per_rank=workers,
                    batch_size=batch,
                    cursors=cursors,
                    start_step=start_step,
                    seed=seed,
                    epoch=epoch,
                )
                for w in range(workers)
            ]
            per_worker = len(plans[0]) // batch
            rank_batches = []
            for n in range(per_worker * workers):  # the DataLoader's order: batch n from worker n % workers
                plan, row = plans[n % workers], (n // workers) * batch
                rank_batches.append((plan.videos[row : row + batch], plan.starts[row : row + batch]))
            if max_batches is not None:
                rank_batches = rank_batches[:max_batches]
            mine = order[rank::world][: len(rank_batches) * batch]
            video = np.searchsorted(bases, mine, side="right") - 1
            local = mine - bases[video]
            uniform_batches = [
                (video[i : i + batch], local[i : i + batch])
                for i in range(0, len(rank_batches) * batch, batch)
            ]
            for acc, group in ((ours, rank_batches), (uniform, uniform_batches)):
                acc["m"] += [distinct_moments(v, s, spec.span) for v, s in group]
                acc["g"] += [mean_pairwise_gap(v, s) for v, s in group]
                acc["w"] += _window_moments(group, spec.span)
    result = {
        "videos_frames": num_frames,
        "clip_length": spec.clip_length,
        "frame_stride": spec.frame_stride,
        "span": spec.span,
        "world_size": world,
        "ranks_measured": world if measured_ranks is None else min(world, measured_ranks),
        "workers": workers,
        "batch_size": batch,
        "cursors": cursors,
        "start_step": start_step,
        "epochs": epochs,
        "ours": _stats(ours["m"], ours["g"], ours["w"]),
        "uniform": _stats(uniform["m"], uniform["g"], uniform["w"]),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    result["gap_ratio"] = round(result["ours"]["gap_mean"] / result["uniform"]["gap_mean"], 3)
    return result


def decode_case(batches: int | None, seed: int) -> dict:
    """configs/demo.yaml's data settings through VideoClipDataModule with 2 worker processes on the bundled video."""
    import torch

    from dora_lightning.data.augment.multicrop import ClipMultiCrop
    from dora_lightning.data.datamodule import VideoClipDataModule

    cfg = data_config("demo")
    dm = VideoClipDataModule(
        paths=str(BUNDLED_VIDEO),
        clip_length=cfg["clip_length"],
        frame_stride=cfg["frame_stride"],
        decode_short_side=cfg["decode_short_side"],
        batch_size=cfg["batch_size"],
        num_workers=cfg["num_workers"],
        cursors=cfg.get("cursors"),
        start_step=cfg["start_step"],
        seed=seed,
        transform=ClipMultiCrop(global_size=32, local_size=16, num_local_crops=1, pre_crop_size=48),
        pin_memory=False,
    )
    dm.setup("fit")
    stream, batch_size, workers = dm.dataset, cfg["batch_size"], cfg["num_workers"]
    plans = [stream.shard_plan(w) for w in range(workers)]
    t0 = time.perf_counter()
    moments, mismatches, seen, decoded, clips = [], 0, set(), 0, 0
    for n, batch in enumerate(dm.train_dataloader()):
        if batches is not None and n >= batches:
            break
        index = batch["clip_index"]
        assert index.dtype == torch.int64 and tuple(index.shape) == (batch_size, 2), (
            index.dtype,
            index.shape,
        )
        plan, row = plans[n % workers], (n // workers) * batch_size
        expected = np.stack(
            [plan.videos[row : row + batch_size], plan.starts[row : row + batch_size]], axis=1
        )
        mismatches += int(not np.array_equal(index.numpy(), expected))
        seen |= {tuple(r) for r in index.tolist()}
        moments.append(distinct_moments(index[:, 0].numpy(), index[:, 1].numpy(), stream.spec.span))
        decoded += int(batch["decoded_frames"].sum())
        clips += batch_size
    return {
        "video": str(BUNDLED_VIDEO.relative_to(REPO_ROOT)),
        "batches": len(moments),
        "batch_size": batch_size,
        "workers": workers,
        "clip_index_mismatches": mismatches,
        "duplicate_clips": clips - len(seen),
        "moments_median": float(np.median(moments)),
        "moments_min": int(np.min(moments)),
        "decoded_per_clip": round(decoded / clips, 3),
        "seconds": round(time.perf_counter() - t0, 2),
    }


def targets(cases: dict) -> dict:
    """The issue's targets (issue 13) checked against the measured statistics."""
    wt, d8, d32 = cases["wt_8x8"], cases["demo_b8"], cases["demo_b32"]
    out = {
        "wt_median_moments_ge_15": wt["ours"]["moments_median"] >= 15,
        "wt_min_moments_ge_12": wt["ours"]["moments_min"] >= 12,
        "wt_gap_ge_0.9_uniform": wt["gap_ratio"] >= 0.9,
        "wt_10_batches_min_ge_144": wt["ours"]["window_min"] >= 0.9 * WINDOW * wt["batch_size"],
        "demo_b8_median_ge_uniform_and_6": d8["ours"]["moments_median"]
        >= max(6, d8["uniform"]["moments_median"]),
        "demo_b32_median_ge_uniform_and_9": d32["ours"]["moments_median"]
        >= max(9, d32["uniform"]["moments_median"]),
    }
    if "decode" in cases:
        out["decode_clip_index_matches_plan"] = cases["decode"]["clip_index_mismatches"] == 0
        out["decode_no_duplicates"] = cases["decode"]["duplicate_clips"] == 0
    return out


def fmt_table(cases: dict) -> str:
    rows = []
    for name, c in cases.items():
        if name == "decode":
            continue
        o, u = c["ours"], c["uniform"]
        window = f"{o['window_median']:g} / {o['window_min']} ({u['window_median']:g} / {u['window_min']})"
        rows.append(
            [
                name,
                f"{c['world_size']} x {c['workers']}, batch {c['batch_size']}, cursors {c['cursors']}, "
                f"step {c['start_step']}",
                str(o["batches"]),
                f"{o['moments_median']:g} / {o['moments_min']} ({u['moments_median']:g} / {u['moments_min']})",
                f"{o['gap_mean']:.0f} ({u['gap_mean']:.0f}) = {c['gap_ratio']:.2f}x",
                window,
            ]
        )
    table = markdown_table(
        [
            "case",
            "ranks x workers, batch",
            "batches",
            "distinct moments / batch: median / min (uniform)",
            "mean pairwise gap, frames (uniform) = ratio",
            f"distinct in {WINDOW} consecutive rank batches of {WINDOW} x batch: median / min (uniform)",
        ],
        rows,
    )
    if "decode" in cases:
        d = cases["decode"]
        table += "\n\n" + markdown_table(
            [
                "decode run",
                "batches",
                "clip_index = plan",
                "duplicates",
                "distinct moments / batch: median / min",
                "decoded frames / clip",
            ],
            [
                [
                    f"demo settings, {d['workers']} workers, batch {d['batch_size']}, {d['video']}",
                    str(d["batches"]),
                    "yes"
                    if d["clip_index_mismatches"] == 0
                    else f"NO ({d['clip_index_mismatches']} batches)",
                    str(d["duplicate_clips"]),
                    f"{d['moments_median']:g} / {d['moments_min']}",
                    f"{d['decoded_per_clip']:.2f}",
                ]
            ],
        )
    return table


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_report_args(p, quick="rank 0 only, fewer batches, one epoch")
    p.add_argument("--epochs", type=int, default=2, help="epochs of the plan cases")
    p.add_argument(
        "--decode-batches",
        type=int,
        default=None,
        help="batches of the decode run (default: one epoch; 0: skip it)",
    )
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    started = dt.datetime.now(dt.timezone.utc)
    epochs = 1 if args.quick else args.epochs
    max_batches = 200 if args.quick else None
    wt, demo = data_config("wt"), data_config("demo")
    wt_spec, demo_spec = (
        ClipSpec(wt["clip_length"], wt["frame_stride"]),
        ClipSpec(demo["clip_length"], demo["frame_stride"]),
    )
    common = dict(seed=args.seed, epochs=epochs, max_batches=max_batches)
    cases = {
        "wt_8x8": plan_case(
            [324_000],
            wt_spec,
            world=8,
            measured_ranks=1 if args.quick else None,
            workers=wt["num_workers"],
            batch=wt["batch_size"],
            cursors=wt.get("cursors"),
            start_step=wt["start_step"],
            **common,
        ),
    }
    # the demo's data settings: on the bundled street video at its batch and at batch 32, and on its own video
    for name, frames, batch, cursors in (
        ("demo_b8", 795, demo["batch_size"], demo.get("cursors")),
        ("demo_b32", 795, 32, None),
        ("demo_photo_walk_b8", PHOTO_WALK_FRAMES, demo["batch_size"], demo.get("cursors")),
    ):
        cases[name] = plan_case(
            [frames],
            demo_spec,
            world=1,
            workers=demo["num_workers"],
            batch=batch,
            cursors=cursors,
            start_step=demo["start_step"],
            **common,
        )
    if args.decode_batches is None or args.decode_batches > 0:
        cases["decode"] = decode_case(args.decode_batches, args.seed)
    met = targets(cases)
    verdicts = ", ".join(f"{k} {'OK' if v else 'MISSED'}" for k, v in met.items())
    return finish_report(
        started, f"{fmt_table(cases)}\n\ntargets: {verdicts}", args.out, cases=cases, targets=met
    )


if __name__ == "__main__":
    main()
