"""Data-loading benchmark: our streaming clip loader versus an official-style random-access loader.

For each case a fresh Python process builds a torch DataLoader (``--workers`` worker processes, ``--batch-size`` clips per
batch, clips of 8 frames 60 frames apart with DoRA's multi-crop: 1 global 224 view + 6 local 112 views per frame),
consumes ``--warmup-batches`` batches, then times a fixed number of clips. Reported per case:

* clips/s: clips emitted over the timed window / its wall time (augmentation included; the main process only
  receives batches, as a training loop's data side would);
* decoded frames per emitted clip: frames the decoder output (each sample reports how many its worker decoded since
  its previous sample) / clips, over the timed window (and, separately, including the warm-up);
* peak memory of the case's process tree (main process + DataLoader workers), sampled by this script from /proc:
  ``peak_rss_mb`` = max over time of the SUM of VmRSS (every 50 ms; counts pages shared between the forked workers,
  such as the torch libraries, once per process, so it overstates the footprint), and ``peak_pss_mb`` = max of the
  sum of PSS (every 1 s; shared pages are split between the processes sharing them, so the sum is the real footprint);
* ``other_cpu_cores``: average CPU used by processes outside the benchmark during the case (from /proc/stat): a
  value well above 0 means the machine was busy and the timings are pessimistic. Before each case the script waits
  (up to ``--quiet-wait`` s) for the other processes to leave the CPUs idle, and reruns a case that was disturbed
  anyway (up to ``--busy-retries`` times), keeping the least disturbed run.

The headline case (our loader on the long video) runs ``--repeats`` times (default 3) in fresh processes and reports
the median run with the spread: this 2-core VM's speed varies by +-15 % from run to run with nothing else running.

Cases: both loaders on a generated long H.264 video (default 1280x720, 60 fps, 180 s, GOP 120, the bundled street
footage upscaled and seen through a moving camera window; see benchmarks/make_long_video.py) and on the bundled video
(``assets/video/vtest.mp4``, 384x288, 10 fps, 795 frames, GOP 10; stride 10 = 1 s apart, as stride 60 at 60 fps);
then our loader on videos of 30 s, 300 s and 3000 s (640x360, 60 fps, GOP 120; the 30 s one is generated, the
longer ones are 10 and 100 copies of it remuxed back to back, which takes seconds instead of an hour of encoding).
640x360 is enough there: our loader decodes 720p and 360p alike to 568x320 (``--decode-short-side 320``), so its
buffers are the same size as for the 720p video. Generated videos are cached under ``bench_out/`` (git-ignored).

Usage::

    python benchmarks/bench_data.py --out docs/benchmarks_data.json     # make bench
    python benchmarks/bench_data.py --quick --out /tmp/bench.json        # smoke run, under a minute
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
from pathlib import Path

# run as a script (python benchmarks/bench_data.py): make the `benchmarks` package importable
if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    REPO_ROOT,
    add_child_args,
    add_quiet_wait_arg,
    run_child_side,
    write_json,
)
from benchmarks.data_cases import measure_case, run_case  # noqa: E402
from benchmarks.data_report import _video_desc, fmt_tables, machine_info, median_run, summarize  # noqa: E402
from benchmarks.make_long_video import DEFAULT_SOURCE, make_video, repeat_video  # noqa: E402

BUNDLED_VIDEO = REPO_ROOT / "assets" / "video" / "vtest.mp4"

# ---------------------------------------------------------------------------------------------------------------
# Orchestration
# ---------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    p.add_argument(
        "--cache-dir", type=Path, default=REPO_ROOT / "bench_out", help="generated videos (git-ignored)"
    )
    p.add_argument("--quick", action="store_true", help="smoke run: tiny videos, few clips (for tests)")
    p.add_argument("--loaders", default="official,ours", help="comma list of: official, ours")
    p.add_argument("--skip-bundled", action="store_true", help="skip the cases on the bundled video")
    p.add_argument("--skip-memory", action="store_true", help="skip the memory-versus-length cases")
    add_quiet_wait_arg(p, default=60)
    p.add_argument(
        "--busy-retries",
        type=int,
        default=2,
        help="rerun a case up to this many times when other processes used the CPUs during it; keep the quietest run",
    )
    g = p.add_argument_group("long video")
    g.add_argument("--width", type=int, default=1280)
    g.add_argument("--height", type=int, default=720)
    g.add_argument("--fps", type=int, default=60)
    g.add_argument("--seconds", type=float, default=180)
    g.add_argument("--gop", type=int, default=120)
    g.add_argument(
        "--source", default=str(DEFAULT_SOURCE), help="content of generated videos; 'none' = synthetic"
    )
    g = p.add_argument_group(
        "memory videos: --mem-seconds generated, then --mem-factor x longer copies, --mem-steps lengths in all"
    )
    g.add_argument("--mem-width", type=int, default=640)
    g.add_argument("--mem-height", type=int, default=360)
    g.add_argument("--mem-seconds", type=float, default=30)
    g.add_argument("--mem-factor", type=int, default=10)
    g.add_argument("--mem-steps", type=int, default=3)
    g = p.add_argument_group("loading")
    g.add_argument("--workers", type=int, default=2)
    g.add_argument("--batch-size", type=int, default=6)
    g.add_argument("--clip-length", type=int, default=8)
    g.add_argument("--stride", type=int, default=60, help="frame stride on the generated videos")
    g.add_argument("--bundled-stride", type=int, default=10, help="frame stride on the bundled 10 fps video")
    g.add_argument("--local-crops", type=int, default=6)
    g.add_argument("--decode-short-side", type=int, default=320, help="our loader's decode-time downscale")
    g.add_argument("--official-clips", type=int, default=60, help="timed clips for the official loader")
    g.add_argument("--ours-clips", type=int, default=600, help="timed clips for our loader")
    g.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="runs of our loader on the long video (the headline number: median)",
    )
    g.add_argument("--warmup-batches", type=int, default=None, help="default: 2 x workers (at least 2)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--case-timeout", type=float, default=900, help="seconds before a case is killed")
    add_child_args(p)
    return p


def _quick_overrides(args: argparse.Namespace) -> None:
    args.width, args.height, args.seconds = 320, 180, 12
    args.mem_width, args.mem_height, args.mem_seconds, args.mem_factor, args.mem_steps = 320, 180, 10, 2, 2
    args.quiet_wait, args.busy_retries = 0, 0
    args.official_clips, args.ours_clips, args.repeats = args.batch_size * 2, args.batch_size * 4, 1
    args.warmup_batches = 1 if args.warmup_batches is None else args.warmup_batches
    args.cache_dir = args.cache_dir / "quick"


def main(argv: list[str] | None = None) -> dict | None:
    args = build_parser().parse_args(argv)
    if run_child_side(args, run_case):
        return None

    t0 = time.monotonic()
    started = dt.datetime.now(dt.timezone.utc)
    if args.quick:
        _quick_overrides(args)
    warmup = args.warmup_batches if args.warmup_batches is not None else max(2, 2 * args.workers)
    loaders = [x.strip() for x in args.loaders.split(",") if x.strip()]
    for name in loaders:
        if name not in ("official", "ours"):
            raise SystemExit(f"unknown loader {name!r} (use official, ours)")
    source = None if args.source.lower() == "none" else args.source
    load_before = os.getloadavg()

    # ---- videos (cached) ----
    t_gen = time.monotonic()
    cache = args.cache_dir
    fps, gop = args.fps, args.gop
    long_path = make_video(
        cache / f"long_{args.width}x{args.height}_{fps}fps_gop{gop}_{args.seconds:g}s.mp4",
        width=args.width, height=args.height, fps=fps, seconds=args.seconds, gop=gop, source=source, verbose=True,
    )  # fmt: skip
    videos = {"long": long_path}
    mem_labels = []
    if not args.skip_memory and "ours" in loaders and args.mem_steps > 0:
        stem = f"mem_{args.mem_width}x{args.mem_height}_{fps}fps_gop{gop}"
        base = make_video(
            cache / f"{stem}_{args.mem_seconds:g}s.mp4",
            width=args.mem_width, height=args.mem_height, fps=fps, seconds=args.mem_seconds, gop=gop, source=source,
            verbose=True,
        )  # fmt: skip
        for step in range(args.mem_steps):
            repeats = args.mem_factor**step
            secs = args.mem_seconds * repeats
            label = f"mem_{secs:g}s"
            videos[label] = (
                base
                if repeats == 1
                else repeat_video(base, cache / f"{stem}_{secs:g}s_repeat.mp4", repeats, True)
            )
            mem_labels.append(label)
    generation_seconds = round(time.monotonic() - t_gen, 1)
    if not args.skip_bundled:
        if BUNDLED_VIDEO.is_file():
            videos["bundled"] = BUNDLED_VIDEO
        else:
            print(f"bundled video {BUNDLED_VIDEO} missing: skipping its cases")

    # ---- cases ----
    cases = []  # (loader, video label, normalise the uint8 views on this CPU in the timed loop)
    for label in ("long", "bundled"):
        if label not in videos:
            continue
        for loader in loaders:
            cases.append((loader, label, False))
            if loader == "ours" and label == "long":
                cases.append((loader, label, True))
    cases += [("ours", label, False) for label in mem_labels]

    results = []
    for loader, label, cpu_norm in cases:
        stride = args.bundled_stride if label == "bundled" else args.stride
        case = {
            "name": f"{loader}_{label}" + ("_cpu_normalised" if cpu_norm else ""),
            "normalize_on_cpu": cpu_norm,
            "loader": loader,
            "video": str(videos[label]),
            "clip_length": args.clip_length,
            "stride": stride,
            "batch_size": args.batch_size,
            "workers": args.workers,
            "local_crops": args.local_crops,
            "decode_short_side": args.decode_short_side if loader == "ours" else None,
            "clips": args.official_clips if loader == "official" else args.ours_clips,
            "warmup_batches": warmup,
            "seed": args.seed,
        }
        repeats = args.repeats if case["name"] == "ours_long" else 1
        print(
            f"== {case['name']}: {case['clips']} clips after {warmup} warm-up batches"
            + (f", {repeats} runs" if repeats > 1 else "")
            + " ...",
            flush=True,
        )
        runs = [
            measure_case(Path(__file__), case, args.quiet_wait, args.busy_retries, args.case_timeout)
            for _ in range(repeats)
        ]
        r = median_run(runs)
        r.update(case, video_label=label, video_info=_video_desc(Path(videos[label])))
        print(
            f"   {r['clips_per_s']:.2f} clips/s, {r['decoded_per_clip']:.1f} decoded frames/clip, "
            f"peak RSS sum {r['peak_rss_mb']:.0f} MB, PSS {r['peak_pss_mb']:.0f} MB, "
            f"other CPU load {r['other_cpu_cores']:.2f} cores",
            flush=True,
        )
        results.append(r)

    total = round(time.monotonic() - t0, 1)
    command = "python benchmarks/bench_data.py " + " ".join(sys.argv[1:] if argv is None else argv)
    report = {
        "command": command.strip(),
        "date_utc": started.strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine_info(),
        "load_average_before": [round(x, 2) for x in load_before],
        "total_seconds": total,
        "video_generation_seconds": generation_seconds,
        "settings": {
            "workers": args.workers,
            "batch_size": args.batch_size,
            "clip_length": args.clip_length,
            "stride": args.stride,
            "bundled_stride": args.bundled_stride,
            "local_crops": args.local_crops,
            "crop_sizes": {"pre_crop": 300, "global": 224, "local": 112},
            "ours_decode_short_side": args.decode_short_side,
            "official": "PyAV, open per sample, decord-style seeks, native resolution, per-frame PIL augmentation",
            "warmup_batches": warmup,
            "memory_videos": (
                f"{args.mem_width}x{args.mem_height} {fps} fps, {args.mem_seconds:g} s generated, longer ones are "
                f"x{args.mem_factor} repeats of it remuxed without re-encoding"
            ),
            "quick": args.quick,
        },
        "summary": summarize(results),
        "results": results,
    }
    m = report["machine"]
    machine_line = (
        f"{m['cpu']}, {m['cpus_usable']} cores usable, {m['memory_gb']} GB RAM, {m['platform']}, Python {m['python']}, "
        f"torch {m['torch']}, torchvision {m['torchvision']}, PyAV {m['av']} (libavcodec {m['ffmpeg']})"
    )
    report["machine_line"] = machine_line
    print()
    print(fmt_tables(results))
    print()
    print(f"machine: {machine_line}")
    print(f"date: {report['date_utc']}; total {total} s (video generation {generation_seconds} s)")
    print("summary:", json.dumps(report["summary"]))
    if args.out is not None:
        write_json(args.out, report)
    return report


if __name__ == "__main__":
    main()
