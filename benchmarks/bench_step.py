"""Training-step benchmark: time and peak memory of one DoRA (and DINO baseline) optimiser step on the CPU.

For each configuration (``--configs``) and method (``--methods``) a fresh Python process builds
``DoRAModule(backbone=..., img_size=224, out_dim=65536, norm_last_layer=False, drop_path_rate=0.1, num_objects=3)``
(``method="dino"`` for the baseline), a random batch shaped exactly like VideoClipDataModule's
(``{"global_views": [(B, T, 3, 224, 224)] (two for DINO), "local_views": 6 x [(B, T, 3, 112, 112)]}``, B = 2), and
runs ``--warmup`` untimed then ``--steps`` timed training steps, each what Lightning's automatic optimisation would
run, WITHOUT Lightning's own overhead (no Trainer, loop, logging or callbacks):

1. ``optimizer.zero_grad(set_to_none=True)``;
2. ``DoRAModule.training_step``'s work: ``compute_loss(batch, teacher_temp=0.04)`` (teacher + tracker, one student
   forward over all k masked views x T frames, one over all local crops), the finiteness check, the teacher entropy
   and the centre update (the ``self.log`` calls are left out);
3. ``loss.backward()``;
4. the per-parameter gradient clip (``dora_lightning.module.per_parameter_clip_``, 3.0);
5. the AdamW step (the module's own ``configure_optimizers``; the head's last layer is NOT frozen: the steady state
   after epoch 0);
6. the EMA teacher update (``dora_lightning.core.ema.ema_update_``, momentum 0.996).

Everything is float32 with ``torch.set_num_threads(--threads)`` (default 2). The module is in train mode (drop path
active in the student); the teacher forward runs under ``no_grad`` (checked: the teacher logits and masked views carry
no graph and no teacher parameter receives a gradient).

Reported per case: the median (and min/mean) step time over the timed steps, a per-phase breakdown (teacher forward +
tracker, student forwards, loss, backward, clip, AdamW, EMA), the process's peak RSS (``ru_maxrss`` read at the end;
GB = KiB / 1024^2), the RSS right after the imports and after building model + optimiser + batch (so peak minus
after-imports is model + optimiser state + activations), and the CPU load of OTHER processes during the timed steps
(from /proc/stat). On a shared 2-core machine another process on one core stalls every parallel op (the OpenMP
barrier waits for the descheduled thread) and can make a step 10x slower, so before each case the script waits (up
to ``--quiet-wait`` s) for idle CPUs, a timed step during which other processes used more than ``--busy-threshold``
cores is set aside (up to ``--max-extra-steps`` more steps replace it), and the statistics use the quiet steps only;
a case with fewer than ``--steps`` quiet steps is flagged BUSY (all step times are in the JSON). The DoRA/DINO ratio is the ratio of the median
step times of the two methods at the same configuration. Official reference numbers (the released code on this
machine kind: fp32, CPU, patch 16, 224/112 crops, 2 clips, 6 local crops, out_dim 65536) and the 0.6x target are in
``OFFICIAL`` / ``TARGET_RATIO`` below.

Usage::

    python benchmarks/bench_step.py --out docs/benchmarks_step.json             # all configs, both methods
    python benchmarks/bench_step.py --configs tiny8 --methods dora --steps 2
    python benchmarks/bench_step.py --quick --out /tmp/bench_step.json            # micro ViT smoke run, seconds
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import subprocess
import sys
import time
from pathlib import Path

# run as a script (python benchmarks/bench_step.py): make the `benchmarks` package importable
if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    REPO_ROOT,
    add_child_args,
    add_quiet_wait_arg,
    base_machine_info,
    markdown_table,
    run_child_case,
    run_child_side,
    wait_for_quiet,
    write_json,
)
from benchmarks.step_case import PHASES, run_case  # noqa: E402

# The released DoRA code on this machine kind (fp32, CPU, patch 16, 224/112 crops, 2 clips, 6 local crops, out_dim 65536)
OFFICIAL = {
    "tiny8": {"step_s": 13.3, "peak_gb": 8.0},
    "tiny2": {"step_s": 2.9, "peak_gb": None},
    "small8": {"step_s": 26.5, "peak_gb": 10.6},
}
OFFICIAL_DORA_DINO_RATIO = (1.8, 2.3)
TARGET_RATIO = 0.6

# name -> case settings (the defaults below complete them)
CONFIGS: dict[str, dict] = {
    "tiny8": {"backbone": "vit_tiny_patch16_224", "frames": 8},
    "tiny2": {"backbone": "vit_tiny_patch16_224", "frames": 2},
    "small8": {"backbone": "vit_small_patch16_224", "frames": 8},
    # the same with the student's blocks recomputed in the backward pass (model.grad_checkpointing)
    "small8_ckpt": {"backbone": "vit_small_patch16_224", "frames": 8, "grad_checkpointing": True},
    # smoke run only: a micro ViT on tiny crops (not comparable to anything)
    "quick": {
        "backbone": "vit_tiny_patch16_224",
        "frames": 2,
        "img_size": 32,
        "local_size": 16,
        "local_crops": 2,
        "out_dim": 256,
        "head_hidden_dim": 64,
        "head_bottleneck_dim": 32,
        "overrides": {"patch_size": 8, "depth": 1, "embed_dim": 48, "num_heads": 3},
    },
}
CASE_DEFAULTS = {
    "img_size": 224,
    "local_size": 112,
    "local_crops": 6,
    "batch_size": 2,
    "out_dim": 65536,
    "head_hidden_dim": 2048,
    "head_bottleneck_dim": 256,
    "overrides": {},
    "num_objects": 3,
    "drop_path_rate": 0.1,
    "teacher_temp": 0.04,
    "clip_grad": 3.0,
    "momentum": 0.996,
    "lr": 1e-4,
    "weight_decay": 0.04,
    "seed": 0,
}
NOTE = (
    "What Lightning's automatic optimisation runs per step (compute_loss, finiteness check, teacher entropy, centre "
    "update, backward, per-parameter clip, AdamW, EMA), WITHOUT Lightning's overhead (no Trainer/loop/logging); "
    "fp32, CPU, random batch, the head's last layer not frozen (steady state after epoch 0)."
)


# ---------------------------------------------------------------------------------------------------------------
# Parent side
# ---------------------------------------------------------------------------------------------------------------


def machine_info() -> dict:
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "import torch, timm, lightning; print(torch.__version__, timm.__version__, lightning.__version__)",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    ).stdout.split()
    versions = dict(zip(("torch", "timm", "lightning"), probe, strict=True)) if len(probe) == 3 else {}
    return {**base_machine_info(), **versions}


def run_case_in_subprocess(case: dict, timeout: float) -> dict:
    """Run one case in a fresh interpreter, so that each peak RSS is its own."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH", "")]))
    wall0 = time.monotonic()
    result = run_child_case(Path(__file__), case, f"{case['config']}/{case['method']}", timeout, env=env)
    result["case_wall_s"] = round(time.monotonic() - wall0, 1)
    return result


def _fmt_ratio(value: float | None, official: float | None) -> str:
    if value is None or not official:
        return "-"
    ratio = value / official
    return f"{ratio:.2f}x {'ok' if ratio <= TARGET_RATIO else 'MISS'}"


def results_table(results: list[dict]) -> str:
    by_key = {(r["config"], r["method"]): r for r in results}
    rows = []
    for r in results:
        official = OFFICIAL.get(r["config"], {}) if r["method"] == "dora" else {}
        ratio = "-"
        if r["method"] == "dora" and (r["config"], "dino") in by_key:
            ratio = f"{r['step_median_s'] / by_key[(r['config'], 'dino')]['step_median_s']:.2f}x"
        rows.append(
            [
                f"{r['config']} ({r['backbone']}, T={r['frames']})", r["method"], f"{r['step_median_s']:.2f}",
                _fmt_ratio(r["step_median_s"], official.get("step_s")), f"{r['peak_rss_gb']:.2f}",
                _fmt_ratio(r["peak_rss_gb"], official.get("peak_gb")), f"{r['rss_after_imports_gb']:.2f}",
                f"{r['peak_minus_imports_gb']:.2f}", ratio,
                f"{r['other_cpu_cores']:.2f}{' BUSY' if r['busy'] else ''}",
            ]
        )  # fmt: skip
    header = [
        "config", "method", "step time, median (s)", "vs official", "peak RSS (GB)", "vs official",
        "RSS after imports (GB)", "peak - imports (GB)", "DoRA/DINO", "other CPU load, timed steps (cores)",
    ]  # fmt: skip
    return markdown_table(header, rows)


def phase_table(results: list[dict]) -> str:
    return markdown_table(
        ["config", "method", *PHASES],
        [[r["config"], r["method"], *(f"{r['phase_median_s'][k]:.2f}" for k in PHASES)] for r in results],
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="tiny8,tiny2,small8", help=f"comma list of: {', '.join(CONFIGS)}")
    p.add_argument("--methods", default="dora,dino", help="comma list of: dora, dino")
    p.add_argument("--steps", type=int, default=3, help="timed steps per case (after the warm-up)")
    p.add_argument(
        "--warmup", type=int, default=1, help="untimed steps first (AdamW allocates its state here)"
    )
    p.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads (default 2; 1 with --quick)"
    )
    p.add_argument("--batch-size", type=int, default=2, help="clips per batch")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    p.add_argument(
        "--quick", action="store_true", help="smoke run: a micro ViT on tiny crops, 1 step (for tests)"
    )
    add_quiet_wait_arg(p, default=300)
    p.add_argument(
        "--busy-threshold",
        type=float,
        default=0.3,
        help="a timed step during which other processes used more CPU cores than this is 'busy' and not counted",
    )
    p.add_argument(
        "--max-extra-steps",
        type=int,
        default=3,
        help="extra timed steps allowed per case to replace busy ones",
    )
    p.add_argument("--case-timeout", type=float, default=1800, help="seconds before a case is killed")
    add_child_args(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if run_child_side(args, run_case):
        return 0

    if args.quick:
        args.configs, args.steps, args.quiet_wait, args.max_extra_steps = "quick", 1, 0, 0
    if args.threads is None:
        args.threads = 1 if args.quick else 2
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [c for c in configs if c not in CONFIGS] + [m for m in methods if m not in ("dora", "dino")]
    if unknown:
        raise SystemExit(f"unknown config/method: {unknown}; configs are {list(CONFIGS)}, methods dora, dino")
    if args.steps < 1 or args.warmup < 0:
        raise SystemExit("--steps must be >= 1 and --warmup >= 0")

    started = dt.datetime.now(dt.timezone.utc)
    wall0 = time.monotonic()
    results = []
    for config in configs:
        for method in methods:
            case = {**CASE_DEFAULTS, **CONFIGS[config]}
            case.update(
                config=config,
                method=method,
                steps=args.steps,
                warmup=args.warmup,
                threads=args.threads,
                batch_size=args.batch_size,
                busy_threshold=args.busy_threshold,
                max_extra_steps=args.max_extra_steps,
            )
            waited, load = wait_for_quiet(args.quiet_wait, args.busy_threshold, include_children=False)
            print(
                f"[bench_step] {config} / {method}: {case['backbone']} T={case['frames']} "
                f"(waited {waited:.0f} s for quiet CPUs; other load {load} cores) ...",
                flush=True,
            )
            measured = run_case_in_subprocess(case, args.case_timeout)
            row = {**case, **measured, "waited_for_quiet_s": waited, "other_cpu_cores_before": load}
            results.append(row)
            print(
                f"[bench_step] {config} / {method}: median step {row['step_median_s']:.2f} s "
                f"(steps {row['step_s']}, other load per step {row['other_cpu_cores_per_step']}, "
                f"{row['quiet_steps']} quiet, warm-up {row['warmup_step_s']}), peak RSS {row['peak_rss_gb']:.2f} GB "
                f"(after imports {row['rss_after_imports_gb']:.2f} GB), other CPU load {row['other_cpu_cores']:.2f} cores",
                flush=True,
            )
    total_wall = time.monotonic() - wall0

    table, phases = results_table(results), phase_table(results)
    print()
    print(f"Training step, fp32, CPU, {args.threads} threads, batch {args.batch_size} clips; {NOTE}")
    print(
        f"Official (released code, same machine kind): {OFFICIAL}; target <= {TARGET_RATIO}x; "
        f"official DoRA/DINO {OFFICIAL_DORA_DINO_RATIO[0]}-{OFFICIAL_DORA_DINO_RATIO[1]}x."
    )
    print()
    print(table)
    print()
    print(
        "Median seconds per phase (teacher_fwd includes the tracker's input taps; loss_and_center = loss + entropy + centre):"
    )
    print()
    print(phases)
    print(f"\nwall time of the whole run: {total_wall:.0f} s")

    if args.out:
        payload = {
            "benchmark": "training step (bench_step.py)",
            "note": NOTE,
            "date": started.isoformat(timespec="seconds"),
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "machine": machine_info(),
            "official": OFFICIAL,
            "official_dora_dino_ratio": list(OFFICIAL_DORA_DINO_RATIO),
            "target_ratio": TARGET_RATIO,
            "settings": {
                "steps": args.steps,
                "warmup": args.warmup,
                "threads": args.threads,
                "batch_size": args.batch_size,
                "busy_threshold": args.busy_threshold,
                "max_extra_steps": args.max_extra_steps,
            },
            "wall_s": round(total_wall, 1),
            "results": results,
            "table_markdown": table,
            "phase_table_markdown": phases,
        }
        write_json(args.out, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
