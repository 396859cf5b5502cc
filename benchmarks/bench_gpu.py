"""GPU training benchmark (issue 15): bare step, Lightning's overhead and ``dora fit`` with the real loader, in at most
``--budget-s`` seconds (default 360; on_device.sh gives 330) on one GPU.

Parts, each in its own process with its own timeout (capped by what is left of the budget), results written to
``OUT_DIR/bench_gpu.json`` and ``OUT_DIR/bench_gpu.md`` after every part (a part that fails or times out is recorded
as such and the next one runs):

1. ``overhead``: DoRA at batch 16, the bare step vs ``Trainer.fit`` on the same device-resident batch (progress bar
   and TensorBoard logger on, as ``dora fit``): time per step, and per step the reads of tensor values into Python and
   the Python numbers turned into tensors (each waits for the GPU), by origin (torch.profiler + a dispatch mode).
2. ``bare``: the bare training step (no Trainer; zero_grad, forward + loss under bf16 autocast, centre, backward,
   per-parameter clip, AdamW, EMA) for DoRA and DINO at batch 16 and 64: step time, clips/s, FLOPs per step
   (``torch.utils.flop_counter`` over one step: matmuls and convolutions, forward and backward), TFLOP/s, peak memory.
   With ``--compile`` the module compiles its blocks and heads first (``configure_model``, which only a Trainer calls
   otherwise), and the warm-up steps pay for the compilation.
3. ``video``: a generated 720p60 H.264 video (``make_long_video.py``, ``--video-seconds``), made in the background
   (nice 10) from the start, while the overhead and bare parts use the GPU and one core.
4. ``fit``: ``Trainer.fit`` with ``VideoClipDataModule`` (configs/wt.yaml's data pipeline, ``--workers`` decoding
   workers) on that video at batch 16 and 64: steps/s, clips/s, data-wait fraction (time in the loader's next() over
   next() + training batch, Lightning's simple profiler), peak memory; TFLOP/s from the bare step's FLOPs per clip.
   In the loader's steady state, not its start-up: a decode cursor's first clip costs a seek and about span + GOP / 2
   decoded 720p frames (445: 8 frames 60 apart, 2 s GOP), each later clip about ``start_step`` (4). wt.yaml's
   cursors (2 x batch_size per worker) made every clip of the old 20 timed steps some cursor's first, so the data
   wait read ~0.9 (measured on the CPU: 445 decoded frames per clip in each of the first 21 batches). So the fit
   parts use ``data.cursors`` = batch_size (a worker's first batch starts all of its cursors), ``workers`` + 1
   warm-up steps (step k's batch is worker k mod workers', so the first ``workers`` steps are the first batches) and
   2 x ``workers`` timed steps (more than the 2 batches per worker the loader can have queued when they begin), on a
   video with 5 batches per worker (``fit_video_seconds``: 82 s for 14 workers at batch 64). Each fit row gives the
   decoded frames per clip of its warm-up and timed steps. A real run's cursors start once an epoch and then take
   hundreds of clips each, so its start-up is amortised (docs/benchmarks.md, "GPU training").

Time budget of the full run (estimates, nothing measured on a GPU yet; from ../shared/docs/gpu.md: bare steps 137 and
424 ms at batch 16 and 64, a 60 s video made in 41 s there; decoding a 720p60 frame and scaling it to 568x320 with
PyAV: 331 frames/s per core on the review's Xeon; the device's CPU speed is unknown), seconds from the start:

    machine info 5; video (82 s of video, ~57 s) in the background from 0 ........... 5
    overhead/dora/b16 ~30 (limit 50), bare/{dora,dino}/b16 ~15-20 each (limit 40) ..... ~75, the video ready
    fit/dora/b16/{cpu,gpu}-aug ~45 each (limit 90): ~15 set-up (interpreter, model, index, 14 forks),
        first batch per worker 16 x 445 = 7.1k frames ~22 (the 14 workers in parallel), 44 steps ~9 .. ~165
    bare/{dora,dino}/b64 ~20 each ...................................................... ~205
    fit/dora/b64/gpu-aug ~120 (limit 150): ~15 set-up, first batch 64 x 445 = 28.5k frames per worker ~86,
        44 steps ~20 ................................................................. ~325
    fit/dora/b64/cpu-aug: runs only if the CPU decodes faster than that; else "no budget left" or a timeout

Within the 330 s that on_device.sh gives, the b16 rows are complete by ~165 s and the b64 bare rows by ~205 s; the
b64 gpu-aug fit fits only just, and the cpu-aug one does not unless the device's cores decode ~1.5 x faster.

The model is configs/wt.yaml's (ViT-S/16, 224/112, T=8, 6 local crops, out_dim 65536) with bf16-mixed precision.
``--smoke`` runs every part on the CPU with a micro ViT, tiny clips and a tiny video (what ``make test`` runs through
on_device.sh: its numbers mean nothing).

Usage::

    python benchmarks/bench_gpu.py bench_out/gpu                      # on a GPU machine (make bench-gpu)
    python benchmarks/bench_gpu.py /tmp/gpu_smoke --smoke             # CPU smoke run
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    REPO_ROOT,
    VideoJob,
    add_child_args,
    base_machine_info,
    markdown_table,
    run_child_case,
    run_child_side,
    write_json,
    wt_settings,
)

MICRO_MODEL = dict(
    backbone="vit_tiny_patch16_224",
    img_size=32,
    patch_size=8,
    depth=2,
    embed_dim=48,
    num_heads=3,
    out_dim=128,
    head_hidden_dim=64,
    head_bottleneck_dim=32,
)


# a part's time limit in seconds (capped by what is left of the budget); see the module docstring for the estimates
LIMITS = {"overhead": 50.0, "bare": 40.0, "fit16": 90.0, "fit64": 150.0, "smoke_fit": 60.0}
COMPILE_S = 150.0  # added to every limit with --compile: the warm-up steps compile the blocks and heads
VIDEO_WAIT_S = 120.0  # longest wait for the video generated in the background


def fit_steps(workers: int) -> tuple[int, int]:
    """(warm-up, timed) steps of a fit part with ``workers`` loader workers: warm-up ``workers`` + 1, so that every
    worker has emitted its first batch (which starts all of its cursors) before the timed steps; timed 2 x
    ``workers``, longer than the queue of batches the loader can hold at their start (prefetch_factor 2 per worker),
    so that workers that cannot keep up show as data wait instead of being hidden by what the start-up queued."""
    return workers + 1, 2 * workers


def fit_batches_per_worker(workers: int) -> int:
    """Batches each worker must be able to emit for a fit part: its share of warm-up + timed steps + the step after
    them, plus one spare (the loader's look-ahead; an epoch that ends is a new start-up)."""
    warmup, steps = fit_steps(workers)
    return math.ceil((warmup + steps + 1) / workers) + 1


def plan(args: argparse.Namespace) -> tuple[dict, list[tuple[str, dict, float]], dict]:
    """(common case settings, [(name, case, timeout s)], video settings) for the full or the smoke run."""
    if args.smoke:
        common = dict(
            device="cpu", precision="32-true", frames=2, global_size=32, local_size=16, local_crops=2
        )
        common |= dict(warmup=1, steps=2, profiled_steps=1, model=MICRO_MODEL, threads=1)
        batches, workers = (2,), 1
        video = dict(width=160, height=96, seconds=4, fps=30)
        fit_extra = dict(
            data=dict(clip_length=2, frame_stride=4, start_step=2, decode_short_side=64),
            transform=dict(
                global_size=32, local_size=16, num_local_crops=2, pre_crop_size=48, colour_backend="fused"
            ),
        )
    else:
        common = dict(device="cuda", precision="bf16-mixed", frames=8, global_size=224, local_size=112)
        common |= dict(local_crops=6, warmup=3, steps=10, profiled_steps=3)
        batches, workers = (16, 64), args.workers
        seconds = args.video_seconds or fit_video_seconds(workers, max(batches), fps=60)
        video = dict(width=1280, height=720, seconds=seconds, fps=60)
        fit_extra = {}
    if args.steps:
        common["steps"] = args.steps
    extra_s = 0.0
    if args.compile:
        # model.compile: every part's model compiles its blocks and heads; the warm-up steps pay for it (two
        # token counts, so a recompile with dynamic shapes, the teacher's no-grad graphs and the backward)
        common["model"] = common.get("model", {}) | {"compile": True}
        common["warmup"] = max(common["warmup"], 2 if args.smoke else 3)
        if (
            args.smoke
        ):  # inductor on 2 CPU cores took 92 s for the micro ViT; dynamo's eager backend takes seconds
            common["compile_backend"] = "eager"
        extra_s = COMPILE_S
    warmup, steps = fit_steps(workers)
    # per batch size: the bare steps, then the fits (whose TFLOP/s uses the bare step's FLOPs), so that a budget
    # running out still leaves complete rows for the smaller batch. At the largest batch the gpu-aug fit comes first:
    # augment_on auto is gpu on a GPU, so it is what a run uses
    parts: list[tuple[str, dict, float]] = [
        (
            f"overhead/dora/b{batches[0]}",
            common | dict(part="overhead", batch_size=batches[0]),
            LIMITS["overhead"] + extra_s,
        )
    ]
    for batch in batches:
        for method in ("dora", "dino"):
            case = common | dict(part="bare", batch_size=batch, methods=[method])
            case["model"] = common.get("model", {}) | {"method": method}
            parts.append((f"bare/{method}/b{batch}", case, LIMITS["bare"] + extra_s))
        limit = LIMITS["smoke_fit"] if args.smoke else LIMITS["fit16" if batch <= 16 else "fit64"]
        for augment_on in ("cpu", "gpu") if batch == batches[0] else ("gpu", "cpu"):
            # augment_on cpu: views made in the workers; gpu: rendered from the frames on the device
            case = common | fit_extra | dict(part="fit", batch_size=batch, workers=workers)
            case |= dict(warmup=warmup, steps=steps)
            # one cursor per clip of a batch: a worker's first batch starts all of its cursors, the rest are cheap
            case["data"] = case.get("data", {}) | {"augment_on": augment_on, "cursors": batch}
            parts.append((f"fit/dora/b{batch}/{augment_on}-aug", case, limit + extra_s))
    return common, parts, video


def fit_video_seconds(workers: int, batch_size: int, fps: int) -> int:
    """Seconds of video that give each of ``workers`` loader workers :func:`fit_batches_per_worker` batches of
    wt.yaml's clips (8 frames 60 apart) at ``batch_size``: 5 batches of 64 for 14 workers, 82 s at 60 fps (each
    worker takes whole batches from its share of the clip starts; with ``data.cursors`` = batch_size each of its
    cursors then gives 5 clips). Longer costs only the generation (in the background of the first parts)."""
    from dora_lightning.data.sampling import ClipSpec

    _, data, _ = wt_settings()
    spec = ClipSpec(data["clip_length"], data["frame_stride"])
    starts = fit_batches_per_worker(workers) * workers * batch_size
    return math.ceil((starts + spec.span - 1) / fps)


def machine_info(device: str) -> dict:
    """Platform, CPU, library versions and (on a GPU run) the device name, from a child process."""
    code = (
        "import torch, lightning, timm; print(torch.__version__, lightning.__version__, timm.__version__);"
        "print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout
    lines = out.splitlines()
    versions = dict(zip(("torch", "lightning", "timm"), lines[0].split(), strict=False)) if lines else {}
    gpu = lines[1] if len(lines) > 1 and lines[1] != "none" else None
    return {**base_machine_info(), **versions, "gpu": gpu, "device": device}


def _fmt(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _bare(report: dict, method: str, batch: int) -> dict | None:
    rows = report["parts"].get(f"bare/{method}/b{batch}", {}).get("results") or []
    return rows[0] if rows else None


def table(report: dict) -> str:
    """The Markdown table of every part run so far."""
    rows = []
    for name, result in report["parts"].items():
        if "error" in result:
            rows.append([name, "failed: " + result["error"], *["-"] * 7])
            continue
        if name.startswith("overhead"):
            bare, fit = result["bare"], result["trainer"]
            note = (
                f"Trainer {fit['step_ms']} ms vs bare {bare['step_ms']} ms (+{result['overhead_pct']} %); "
                f"value reads/step {fit['value_reads_outside_optimiser_per_step']} (bare "
                f"{bare['value_reads_outside_optimiser_per_step']}), numbers to tensors/step "
                f"{fit['numbers_to_tensors_per_step']} (bare {bare['numbers_to_tensors_per_step']})"
            )
            rows.append([name, _fmt(fit["step_ms"]), "-", "-", "-", "-", "-", note])
        elif name.startswith("bare"):
            for r in result["results"]:
                note = (
                    f"compiled ({r.get('compile_backend')}, {r['compiled_regions']} regions; warm-up "
                    f"{r['warmup_s']} s; graphs compiled in the timed steps: {r['graphs_compiled_timed']})"
                    if r.get("compile")
                    else ""
                )
                rows.append(
                    [name, _fmt(r["step_ms"]), _fmt(r["clips_per_s"]), _fmt(r["tflops_per_s"], 3),
                     _fmt(r["peak_gib"]), "-", f"{r['flops_per_step'] / 1e9:.4g} GFLOP/step", note]
                )  # fmt: skip
        elif name.startswith("fit"):
            bare = _bare(report, "dora", result["batch_size"])
            decoded = result.get("decoded_frames_per_clip") or {}
            per_clip = bare["flops_per_step"] / result["batch_size"] if bare else None
            tflops = per_clip * result["clips_per_s"] / 1e12 if per_clip else None
            result["tflops_per_s"] = round(tflops, 3) if tflops is not None else None
            result["clips_per_s_vs_bare"] = (
                round(result["clips_per_s"] / bare["clips_per_s"], 3) if bare else None
            )
            rows.append(
                [name, _fmt(1e3 / result["steps_per_s"]), _fmt(result["clips_per_s"]), _fmt(tflops, 3),
                 _fmt(result["peak_gib"]), _fmt(result["data_wait_fraction"], 3),
                 "bare step's per clip" if per_clip else "-",
                 f"{result['workers']} workers, {result['cursors']} cursors each; {result['warmup_steps']} warm-up + "
                 f"{result['timed_steps']} timed steps; decoded frames/clip {_fmt(decoded.get('warmup'))} warm-up, "
                 f"{_fmt(decoded.get('timed'))} timed; {_fmt(result['clips_per_s_vs_bare'], 3)} x the bare step's "
                 f"clips/s"]
            )  # fmt: skip
        else:
            during = ", ".join(result.get("made_during") or []) or "nothing"
            rows.append(
                [
                    name,
                    *["-"] * 6,
                    f"{result.get('seconds', '-')} s, during {during}; waited {result.get('waited_s')} s",
                ]
            )
    header = ["part", "ms/step", "clips/s", "TFLOP/s", "peak GiB", "data wait", "FLOPs", "notes"]
    when = f"{report['date_utc']} on {report['machine'].get('gpu') or report['machine']['cpu']}"
    return f"# bench_gpu.py ({'smoke, CPU' if report['smoke'] else 'GPU'}), {when}\n\n" + markdown_table(
        header, rows
    )


def save(out_dir: Path, report: dict) -> None:
    """Write the JSON and the Markdown table as they stand (after every part)."""
    text = table(report)
    write_json(out_dir / "bench_gpu.json", report)
    (out_dir / "bench_gpu.md").write_text(text + "\n")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "out_dir", nargs="?", default="bench_out/gpu", help="folder for bench_gpu.json and .md"
    )
    parser.add_argument("--smoke", action="store_true", help="every part on the CPU, micro sizes (seconds)")
    parser.add_argument("--budget-s", type=float, default=360.0, help="wall-clock budget for all parts")
    parser.add_argument("--workers", type=int, default=14, help="data-loader workers of the fit parts")
    parser.add_argument("--video", help="use this video for the fit parts instead of generating one")
    parser.add_argument(
        "--video-seconds",
        type=float,
        help="length of the generated 720p60 video (default: enough clip starts for the fit parts' warm-up and timed "
        "steps at the largest batch size, plus a spare batch per worker: 82 s for 14 workers and batch 64)",
    )
    parser.add_argument(
        "--steps", type=int, help="timed steps of the overhead and bare parts (default 10; smoke 2)"
    )
    parser.add_argument("--only", nargs="*", help="run only the parts whose name starts with one of these")
    parser.add_argument("--compile", action="store_true", help="model.compile: true in every part")
    add_child_args(parser)
    return parser


def report_settings(args: argparse.Namespace, common: dict) -> dict:
    """The run's settings for the JSON: the common case settings (the model's by name), the budget and compile."""
    model = common.get("model") or {}
    return {k: v for k, v in common.items() if k != "model"} | {
        "model": "micro ViT (MICRO_MODEL)" if args.smoke else "configs/wt.yaml's",
        "compile": bool(model.get("compile")),
        "budget_s": args.budget_s,
    }


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if run_child_side(args, _run_case):
        return 0
    start = time.monotonic()
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    common, parts, video_settings = plan(args)
    wanted = lambda name: not args.only or any(name.startswith(p) for p in args.only)  # noqa: E731
    generated = f"dora_bench_gpu_{video_settings['height']}p_{video_settings['seconds']:g}s.mp4"
    video = Path(args.video) if args.video else Path(tempfile.gettempdir()) / generated  # not into out_dir
    reused = video.is_file()
    fits = any(name.startswith("fit") and wanted(name) for name, _, _ in parts)
    job = VideoJob(video, video_settings) if fits and not reused else None
    made_during: list[str] = []
    report = {
        "date_utc": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "smoke": args.smoke,
        "machine": machine_info(common["device"]),
        "settings": report_settings(args, common),
        "parts": {},
    }
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH", "")]))
    try:
        for name, case, limit in parts:
            if not wanted(name):
                continue
            left = args.budget_s - (time.monotonic() - start)
            if left < 5:
                report["parts"][name] = {"error": "no budget left"}
                continue
            t0 = time.monotonic()
            if job and job.proc.poll() is None and not name.startswith("fit"):
                made_during.append(name)  # ran while the video was being generated
            try:
                if name.startswith("fit") and "video" not in report["parts"]:
                    try:
                        made = job.wait(min(VIDEO_WAIT_S, left)) if job else 0.0
                    except RuntimeError as err:
                        report["parts"]["video"] = {"error": str(err)[:200]}
                        raise
                    report["parts"]["video"] = {
                        "seconds": round(made, 1),
                        "waited_s": round(time.monotonic() - t0, 1),
                        "made_during": list(made_during),
                        "path": str(video),
                        "reused": reused,
                    }
                if name.startswith("fit"):
                    if "error" in report["parts"]["video"]:
                        raise RuntimeError("no video")
                    case = case | {"video": str(video)}
                left = args.budget_s - (time.monotonic() - start)
                report["parts"][name] = run_child_case(Path(__file__), case, name, min(limit, left), env=env)
            except (RuntimeError, subprocess.SubprocessError, OSError) as err:
                report["parts"][name] = {"error": str(err)[:200]}
            report["parts"][name]["part_wall_s"] = round(time.monotonic() - t0, 1)
            save(out_dir, report)
            print(f"{name}: {time.monotonic() - t0:.1f} s", flush=True)
    finally:
        if job:
            job.stop()
    report["total_wall_s"] = round(time.monotonic() - start, 1)
    save(out_dir, report)
    print(table(report))
    return 0 if all("error" not in r for r in report["parts"].values()) else 1


def _run_case(case: dict) -> dict:
    from benchmarks.gpu_cases import run_case

    return run_case(case)


if __name__ == "__main__":
    sys.exit(main())
