"""GPU training benchmark (issue 15): bare step, Lightning's overhead and ``dora fit`` with the real loader, in at most
``--budget-s`` seconds (default 360) on one GPU.

Parts, each in its own process with its own timeout (capped by what is left of the budget), results written to
``OUT_DIR/bench_gpu.json`` and ``OUT_DIR/bench_gpu.md`` after every part (a part that fails or times out is recorded
as such and the next one runs):

1. ``overhead``: DoRA at batch 16, the bare step vs ``Trainer.fit`` on the same device-resident batch (progress bar
   and TensorBoard logger on, as ``dora fit``): time per step, and per step the reads of tensor values into Python and
   the Python numbers turned into tensors (each waits for the GPU), by origin (torch.profiler + a dispatch mode).
2. ``bare``: the bare training step (no Trainer; zero_grad, forward + loss under bf16 autocast, centre, backward,
   per-parameter clip, AdamW, EMA) for DoRA and DINO at batch 16 and 64: step time, clips/s, FLOPs per step
   (``torch.utils.flop_counter`` over one step: matmuls and convolutions, forward and backward), TFLOP/s, peak memory.
3. ``video``: a generated 720p60 H.264 video (``make_long_video.py``, ``--video-seconds``).
4. ``fit``: ``Trainer.fit`` with ``VideoClipDataModule`` (configs/wt.yaml's data pipeline, ``--workers`` decoding
   workers) on that video at batch 16 and 64: steps/s, clips/s, data-wait fraction (time in the loader's next() over
   next() + training batch, Lightning's simple profiler), peak memory; TFLOP/s from the bare step's FLOPs per clip.

The model is configs/wt.yaml's (ViT-S/16, 224/112, T=8, 6 local crops, out_dim 65536) with bf16-mixed precision.
``--smoke`` runs every part on the CPU with a micro ViT, tiny clips and a tiny video in well under a minute (what
``make test`` runs: its numbers mean nothing).

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
    if args.compile:
        # model.compile: every part's model compiles its blocks and heads (its first steps pay for it)
        common["model"] = common.get("model", {}) | {"compile": True}
    # a part's time limit in seconds; with --compile its first steps also compile the blocks and heads
    slack = 3.0 if args.compile else 1.0
    # per batch size: the bare steps, then the fit (whose TFLOP/s uses the bare step's FLOPs), so that a budget
    # running out still leaves complete rows for the smaller batch
    parts: list[tuple[str, dict, float]] = [
        (f"overhead/dora/b{batches[0]}", common | dict(part="overhead", batch_size=batches[0]), 50 * slack)
    ]
    for batch in batches:
        for method in ("dora", "dino"):
            case = common | dict(part="bare", batch_size=batch, methods=[method])
            case["model"] = common.get("model", {}) | {"method": method}
            parts.append((f"bare/{method}/b{batch}", case, 40 * slack))
        for augment_on in ("cpu", "gpu"):  # views made in the workers, or from the frames on the device
            case = common | fit_extra | dict(part="fit", batch_size=batch, workers=workers)
            case |= dict(warmup=2 if args.smoke else 5, steps=2 if args.smoke else 15)
            case["data"] = case.get("data", {}) | {"augment_on": augment_on}
            parts.append((f"fit/dora/b{batch}/{augment_on}-aug", case, 60 * slack))
    return common, parts, video


def fit_video_seconds(workers: int, batch_size: int, fps: int, batches_per_worker: int = 2) -> int:
    """Seconds of video that give each loader worker ``batches_per_worker`` batches of wt.yaml's clips (each worker
    takes whole batches from its share of the clip starts: a 20 s video has 780 starts of 8 frames 1 s apart, 55 per
    worker of 14, not one batch of 64)."""
    from dora_lightning.data.sampling import ClipSpec

    _, data, _ = wt_settings()
    spec = ClipSpec(data["clip_length"], data["frame_stride"])
    starts = batches_per_worker * workers * batch_size
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


def make_video(path: Path, settings: dict, timeout: float) -> None:
    """The generated H.264 video of ``settings`` at ``path`` (make_long_video.py; reused when it exists)."""
    cmd = [sys.executable, str(REPO_ROOT / "benchmarks" / "make_long_video.py"), str(path)]
    cmd += [f"--{key}={value}" for key, value in settings.items()]
    subprocess.run(cmd, check=True, timeout=timeout, cwd=REPO_ROOT, capture_output=True)


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
                rows.append(
                    [name, _fmt(r["step_ms"]), _fmt(r["clips_per_s"]), _fmt(r["tflops_per_s"], 3),
                     _fmt(r["peak_gib"]), "-", f"{r['flops_per_step'] / 1e9:.4g} GFLOP/step", ""]
                )  # fmt: skip
        elif name.startswith("fit"):
            bare = _bare(report, "dora", result["batch_size"])
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
                 f"{result['workers']} workers; {_fmt(result['clips_per_s_vs_bare'], 3)} x the bare step's clips/s"]
            )  # fmt: skip
        else:
            rows.append([name, *["-"] * 6, f"{result.get('seconds', '-')} s"])
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
        help="length of the generated 720p60 video (default: enough clip starts for 2 batches of the largest batch "
        "size per worker: 37 s for 14 workers and batch 64)",
    )
    parser.add_argument(
        "--steps", type=int, help="timed steps of the overhead and bare parts (default 10; smoke 2)"
    )
    parser.add_argument("--only", nargs="*", help="run only the parts whose name starts with one of these")
    parser.add_argument("--compile", action="store_true", help="model.compile: true in every part")
    add_child_args(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if run_child_side(args, _run_case):
        return 0
    start = time.monotonic()
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    common, parts, video_settings = plan(args)
    report = {
        "date_utc": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "smoke": args.smoke,
        "machine": machine_info(common["device"]),
        "settings": {k: v for k, v in common.items() if k != "model"} | {"budget_s": args.budget_s},
        "parts": {},
    }
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH", "")]))
    generated = f"dora_bench_gpu_{video_settings['height']}p_{video_settings['seconds']:g}s.mp4"
    video = Path(args.video) if args.video else Path(tempfile.gettempdir()) / generated  # not into out_dir
    wanted = lambda name: not args.only or any(name.startswith(p) for p in args.only)  # noqa: E731
    for name, case, limit in parts:
        if not wanted(name):
            continue
        left = args.budget_s - (time.monotonic() - start)
        if left < 5:
            report["parts"][name] = {"error": "no budget left"}
            continue
        t0 = time.monotonic()
        try:
            if name.startswith("fit") and "video" not in report["parts"]:
                reused = video.is_file()
                if not reused:
                    make_video(video, video_settings, timeout=min(90.0, left))
                report["parts"]["video"] = {
                    "seconds": round(time.monotonic() - t0, 1),
                    "path": str(video),
                    "reused": reused,
                }
            case = case | ({"video": str(video)} if name.startswith("fit") else {})
            left = args.budget_s - (time.monotonic() - start)
            report["parts"][name] = run_child_case(Path(__file__), case, name, min(limit, left), env=env)
        except (RuntimeError, subprocess.SubprocessError, OSError) as err:
            report["parts"][name] = {"error": str(err)[:200]}
        report["parts"][name]["part_wall_s"] = round(time.monotonic() - t0, 1)
        save(out_dir, report)
        print(f"{name}: {time.monotonic() - t0:.1f} s", flush=True)
    report["total_wall_s"] = round(time.monotonic() - start, 1)
    save(out_dir, report)
    print(table(report))
    return 0 if all("error" not in r for r in report["parts"].values()) else 1


def _run_case(case: dict) -> dict:
    from benchmarks.gpu_cases import run_case

    return run_case(case)


if __name__ == "__main__":
    sys.exit(main())
