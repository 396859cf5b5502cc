"""DAVIS label-propagation benchmark: frames per second and peak memory of the DAVIS evaluator on the CPU.

A randomly initialised ViT-S/16 (``vit_small_patch16_224`` via ``build_vit``) propagates the first-frame masks of one
synthetic sequence (``dora_lightning.evaluation.synthetic.make_davis_fixture``: 854x480 frames like DAVIS 480p, 2 objects) through
:class:`evaluators.davis.evaluator.DavisPropagationModule` run by ``trainer.validate`` with the default protocol (short side 480
-> 480x848 input, 1,590 patches; 7 previous frames + the first as context, radius 12, top-5). Every step is timed:
frame reading (dataloader, main process), backbone forward, propagation + upsampling + PNG writing, J/F scoring; the
first ``--warmup`` frames are excluded. Peak memory is the case process's max RSS (a fresh interpreter), with the RSS
after the model is built, at the first timed frame, once the context queue is full and at the last frame (flat from
"queue full" on when memory is bounded by the context queue).

    python benchmarks/bench_davis.py --out bench_out/bench_davis.json      # ~2 min on 2 cores
    python benchmarks/bench_davis.py --frames 4 --warmup 1 --height 240 --width 427   # a quick look
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# run as a script (python benchmarks/bench_davis.py): make the `benchmarks` package importable
if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    CpuSample,
    add_child_args,
    add_quiet_wait_arg,
    base_machine_info,
    cpu_cores_between,
    markdown_table,
    read_proc_kib,
    run_child_case,
    run_child_side,
    wait_for_quiet,
    write_json,
)


def _rss_gb() -> float:
    return read_proc_kib("/proc/self/status", "VmRSS:") / 1024**2


def run_case(case: dict) -> dict:
    """In the child process: build the fixture and the model, run the evaluator's module, return the timings."""
    import resource

    import lightning.pytorch as pl
    import torch

    import evaluators.davis.evaluator as davis
    from dora_lightning.evaluation.synthetic import make_davis_fixture
    from dora_lightning.models.backbone import build_vit
    from evaluators.davis.data import scan_davis
    from evaluators.davis.evaluator import DavisPropagationModule

    torch.set_num_threads(case["threads"])
    torch.manual_seed(0)
    frames_total = case["warmup"] + case["frames"]
    with tempfile.TemporaryDirectory() as tmp:
        root = make_davis_fixture(
            Path(tmp) / "davis",
            sequences=1,
            frames=frames_total,
            size=(case["height"], case["width"]),
            seed=0,
        )
        backbone = build_vit(case["arch"], img_size=224).eval()
        rss_model = _rss_gb()
        timings: list[dict[str, Any]] = []
        score_s: list[float] = [0.0]
        frame_scores = davis.frame_scores

        def timed_frame_scores(*args: Any, **kwargs: Any) -> Any:  # J and F of one frame, timed
            start = time.perf_counter()
            result = frame_scores(*args, **kwargs)
            score_s[0] += time.perf_counter() - start
            return result

        davis.frame_scores = timed_frame_scores

        class Timed(DavisPropagationModule):
            def frame_features(self, batch: dict[str, Any]) -> torch.Tensor:
                start = time.perf_counter()
                features = super().frame_features(batch)
                self._forward_s = time.perf_counter() - start
                return features

            def on_validation_batch_start(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
                score_s[0] = 0.0
                self._step_start = (time.perf_counter(), CpuSample.now(include_children=False))

            def on_validation_batch_end(
                self, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
            ):
                end, sample = time.perf_counter(), CpuSample.now(include_children=False)
                start, first = self._step_start
                read_s = start - getattr(self, "_previous_end", self._loop_start)
                self._previous_end = end
                own, other = cpu_cores_between(first, sample)
                timings.append(
                    {
                        "index": int(batch["index"]),
                        "read_s": read_s,
                        "forward_s": self._forward_s,
                        "score_s": score_s[0],
                        "step_s": end - start,
                        "other_cpu_cores": other,
                        "rss_gb": _rss_gb(),
                    }
                )

            def on_validation_epoch_start(self) -> None:
                super().on_validation_epoch_start()
                self._loop_start = time.perf_counter()

        module = Timed(
            backbone, scan_davis(root), Path(tmp) / "out", short_side=case["short_side"], num_workers=0
        )
        trainer = pl.Trainer(
            accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
        )
        trainer.validate(module, verbose=False)
    timed = [t for t in timings if t["index"] >= case["warmup"]]
    seconds = sum(t["read_s"] + t["step_s"] for t in timed)
    forward = sum(t["forward_s"] for t in timed)
    score = sum(t["score_s"] for t in timed)
    full_queue = [t for t in timed if t["index"] > module.n_last_frames]  # context queue full from here on
    steps = sum(t["step_s"] for t in timed)
    return {
        "frames_timed": len(timed),
        "frames_per_s": round(len(timed) / seconds, 3),
        "seconds_per_frame": round(seconds / len(timed), 3),
        "read_s_per_frame": round(sum(t["read_s"] for t in timed) / len(timed), 3),
        "forward_s_per_frame": round(forward / len(timed), 3),
        "propagate_write_s_per_frame": round((steps - forward - score) / len(timed), 3),
        "score_s_per_frame": round(score / len(timed), 3),
        "warmup_frame_s": [
            round(t["read_s"] + t["step_s"], 3) for t in timings if t["index"] < case["warmup"]
        ],
        "other_cpu_cores": round(sum(t["other_cpu_cores"] for t in timed) / len(timed), 2),
        "rss_after_model_gb": round(rss_model, 3),
        "rss_first_timed_frame_gb": round(timed[0]["rss_gb"], 3),
        "rss_queue_full_gb": round(full_queue[0]["rss_gb"], 3) if full_queue else None,
        "rss_last_timed_frame_gb": round(timed[-1]["rss_gb"], 3),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 3),
        "j_and_f_mean": round(module.metrics["davis/J&F-mean"], 2),
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--arch", default="vit_small_patch16_224", help="timm ViT (random weights)")
    parser.add_argument("--frames", type=int, default=20, help="timed frames (after the warm-up frames)")
    parser.add_argument(
        "--warmup", type=int, default=2, help="frames run first and not timed (frame 0 included)"
    )
    parser.add_argument("--height", type=int, default=480, help="frame height of the synthetic sequence")
    parser.add_argument("--width", type=int, default=854, help="frame width of the synthetic sequence")
    parser.add_argument("--short-side", type=int, default=480, help="the evaluator's short_side")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--case-timeout", type=float, default=900.0)
    parser.add_argument(
        "--busy-threshold", type=float, default=0.3, help="'quiet' = other processes below this"
    )
    parser.add_argument("--out", default=None, help="write the report as JSON here")
    add_quiet_wait_arg(parser, default=60.0)
    add_child_args(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if run_child_side(args, run_case):
        return 0
    if args.frames < 1 or args.warmup < 1:
        raise SystemExit("--frames and --warmup must be >= 1 (frame 0, the ground truth, is always warm-up)")
    case = {
        k: getattr(args, k) for k in ("arch", "frames", "warmup", "height", "width", "short_side", "threads")
    }
    waited, load = wait_for_quiet(args.quiet_wait, args.busy_threshold, include_children=False)
    print(
        f"[bench_davis] {case} (waited {waited:.0f} s for quiet CPUs; other load {load} cores) ...",
        flush=True,
    )
    started = dt.datetime.now(dt.timezone.utc)
    wall0 = time.monotonic()
    result = run_child_case(Path(__file__), case, "davis", args.case_timeout)
    result.update(
        case_wall_s=round(time.monotonic() - wall0, 1), waited_for_quiet_s=waited, other_cpu_before=load
    )
    queue_full = result["rss_queue_full_gb"]
    header = ["frames/s", "s/frame", "read", "forward", "propagate+write", "score", "peak RSS (GB)"]
    header.append("RSS first / queue full / last (GB)")
    row = [
        f"{result['frames_per_s']:.2f}",
        f"{result['seconds_per_frame']:.2f}",
        f"{result['read_s_per_frame']:.3f}",
        f"{result['forward_s_per_frame']:.3f}",
        f"{result['propagate_write_s_per_frame']:.3f}",
        f"{result['score_s_per_frame']:.3f}",
        f"{result['peak_rss_gb']:.2f}",
        f"{result['rss_first_timed_frame_gb']:.2f} / {'-' if queue_full is None else f'{queue_full:.2f}'} / "
        f"{result['rss_last_timed_frame_gb']:.2f}",
    ]
    print(
        f"\nDAVIS propagation, {args.arch} (random weights), {args.height}x{args.width} frames, CPU {args.threads}"
    )
    print(
        f"threads, {result['frames_timed']} timed frames; other CPU load {result['other_cpu_cores']} cores\n"
    )
    print(markdown_table(header, [row]))
    if args.out:
        import torch

        write_json(
            Path(args.out),
            {
                "benchmark": "DAVIS label propagation (bench_davis.py)",
                "date": started.isoformat(timespec="seconds"),
                "command": " ".join([Path(sys.executable).name, *sys.argv]),
                "machine": {**base_machine_info(), "torch": torch.__version__},
                "settings": case,
                "results": [result],
            },
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
