"""bench_data.py's report: the targets its headline is checked against, the machine and video descriptions it
records, the headline run chosen among repeats (the median), the summary and the markdown tables it prints."""

from __future__ import annotations

import subprocess
from pathlib import Path

from benchmarks.common import REPO_ROOT, base_machine_info, markdown_table
from benchmarks.make_long_video import probe_video

# The official loader measured on a 720p60 GOP-120 video on this machine kind (2 workers, 8 frames, stride 60, 6 locals).
REFERENCE_OFFICIAL_CLIPS_PER_S = 1.24
TARGET_SPEEDUP = 50.0
# spec G.4 (amended 2026-12-04): batch diversity first; <= 16 decoded frames per clip is still 20x below the official
# loader (~377). The many far-apart cursors per worker decode about start_step + a seek and a span per cursor stretch.
TARGET_DECODED_PER_CLIP = 16.0


def machine_info() -> dict:
    import av
    import numpy
    import PIL
    import torch
    import torchvision

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {
        **base_machine_info(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "av": av.__version__,
        "ffmpeg": ".".join(str(x) for x in av.library_versions.get("libavcodec", ())),
        "numpy": numpy.__version__,
        "pillow": PIL.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "git_commit": commit or None,
    }


def _video_desc(path: Path) -> dict:
    info = probe_video(path)
    return {
        "path": str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT) else str(path),
        "width": info["width"],
        "height": info["height"],
        "fps": info["fps"],
        "frames": info["frames"],
        "seconds": round(info["frames"] / info["fps"], 1) if info["fps"] else None,
        "mbytes": round(path.stat().st_size / 1e6, 1),
    }


def _vid(r: dict) -> str:
    v = r["video_info"]
    label = "bundled" if r["video_label"] == "bundled" else "generated"
    return f"{label} {v['width']}x{v['height']} {v['fps']:g} fps {v['seconds']:g} s"


def median_run(runs: list[dict]) -> dict:
    """The run with the median clips/s (the lower middle one for an even count), with every run's clips/s in
    ``clips_per_s_runs`` when there are several: this machine's speed varies by +-15 % from run to run."""
    ordered = sorted(runs, key=lambda r: r["clips_per_s"])
    chosen = dict(ordered[(len(ordered) - 1) // 2])
    if len(runs) > 1:
        chosen["clips_per_s_runs"] = [round(r["clips_per_s"], 2) for r in runs]
    return chosen


def _rate(r: dict) -> str:
    runs = r.get("clips_per_s_runs")
    spread = f" (median of {len(runs)}: {min(runs):.1f}-{max(runs):.1f})" if runs else ""
    return f"{r['clips_per_s']:.2f}{spread}"


def fmt_tables(results: list[dict]) -> str:
    """Markdown: throughput table (long + bundled video) and memory-versus-length table."""
    mem = [r for r in results if r["video_label"].startswith("mem")]
    out = markdown_table(
        [
            "loader", "video", "stride", "clips timed", "clips/s", "decoded frames / clip (incl. warm-up)",
            "peak PSS MB", "peak RSS sum MB", "other CPU load",
        ],
        [
            [
                r["loader"] + (" + CPU normalisation" if r.get("normalize_on_cpu") else ""), _vid(r), str(r["stride"]),
                str(r["clips"]), _rate(r),
                f"{r['decoded_per_clip']:.2f} ({r['decoded_per_clip_incl_warmup']:.2f})", f"{r['peak_pss_mb']:.0f}",
                f"{r['peak_rss_mb']:.0f}", f"{r['other_cpu_cores']:.2f}",
            ]
            for r in results
            if not r["video_label"].startswith("mem")
        ],
    )  # fmt: skip
    if mem:
        out += "\n\n" + markdown_table(
            [
                "loader", "video", "frames", "peak PSS MB", "peak RSS sum MB", "largest worker max RSS MB",
                "clips/s", "other CPU load",
            ],
            [
                [
                    r["loader"], _vid(r), str(r["video_info"]["frames"]), f"{r['peak_pss_mb']:.0f}",
                    f"{r['peak_rss_mb']:.0f}", f"{r['maxrss_largest_worker_mb']:.0f}", f"{r['clips_per_s']:.2f}",
                    f"{r['other_cpu_cores']:.2f}",
                ]
                for r in mem
            ],
        )  # fmt: skip
    return out


def summarize(results: list[dict]) -> dict:
    by = {r["name"]: r for r in results}
    s: dict = {"reference_official_clips_per_s": REFERENCE_OFFICIAL_CLIPS_PER_S}
    if "ours_long" in by:
        ours = by["ours_long"]
        s["ours_long_clips_per_s"] = ours["clips_per_s"]
        if "clips_per_s_runs" in ours:
            s["ours_long_clips_per_s_runs"] = ours["clips_per_s_runs"]
        s["speedup_vs_reference"] = round(ours["clips_per_s"] / REFERENCE_OFFICIAL_CLIPS_PER_S, 1)
        s["target_clips_per_s"] = round(TARGET_SPEEDUP * REFERENCE_OFFICIAL_CLIPS_PER_S, 1)
        s["meets_speed_target"] = ours["clips_per_s"] >= s["target_clips_per_s"]
        s["ours_long_decoded_per_clip"] = ours["decoded_per_clip"]
        s["meets_decode_target"] = ours["decoded_per_clip"] <= TARGET_DECODED_PER_CLIP
        if "ours_long_cpu_normalised" in by:
            s["ours_long_cpu_normalised_clips_per_s"] = by["ours_long_cpu_normalised"]["clips_per_s"]
        if "official_long" in by:
            s["speedup_vs_measured_official"] = round(
                ours["clips_per_s"] / by["official_long"]["clips_per_s"], 1
            )
    mem = [r for r in results if r["video_label"].startswith("mem")]
    if len(mem) >= 2:
        s["memory_video_seconds"] = [r["video_info"]["seconds"] for r in mem]
        s["memory_peak_pss_mb"] = [r["peak_pss_mb"] for r in mem]
        s["memory_peak_rss_sum_mb"] = [r["peak_rss_mb"] for r in mem]
        s["memory_peak_pss_ratio_to_previous"] = [
            round(b["peak_pss_mb"] / a["peak_pss_mb"], 3) for a, b in zip(mem[:-1], mem[1:], strict=True)
        ]
    return s
