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
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

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
PHASES = (
    "zero_grad",
    "teacher_fwd",
    "tracker",
    "student_fwd",
    "loss_and_center",
    "backward",
    "clip",
    "adamw",
    "ema",
)
NOTE = (
    "What Lightning's automatic optimisation runs per step (compute_loss, finiteness check, teacher entropy, centre "
    "update, backward, per-parameter clip, AdamW, EMA), WITHOUT Lightning's overhead (no Trainer/loop/logging); "
    "fp32, CPU, random batch, the head's last layer not frozen (steady state after epoch 0)."
)


# ---------------------------------------------------------------------------------------------------------------
# Process statistics
# ---------------------------------------------------------------------------------------------------------------


def _rss_kib() -> int:
    """Current resident set size of this process in KiB (VmRSS)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _max_rss_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def _gb(kib: float) -> float:
    return round(kib / 1024**2, 3)


def _cpu_busy_seconds() -> float:
    """Busy CPU time of the whole machine (all cores), from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _own_cpu_seconds() -> float:
    me = resource.getrusage(resource.RUSAGE_SELF)
    return me.ru_utime + me.ru_stime


def other_cpu_load(window: float = 2.0) -> float:
    """CPU cores used by other processes, averaged over ``window`` seconds."""
    busy0, own0 = _cpu_busy_seconds(), _own_cpu_seconds()
    time.sleep(window)
    busy1, own1 = _cpu_busy_seconds(), _own_cpu_seconds()
    return max(0.0, (busy1 - busy0) - (own1 - own0)) / window


def wait_for_quiet(max_wait: float, threshold: float) -> tuple[float, float]:
    """Wait (up to ``max_wait`` s) until other processes use at most ``threshold`` cores; return (waited s, load)."""
    t0 = time.monotonic()
    while True:
        load = other_cpu_load()
        waited = time.monotonic() - t0
        if load <= threshold or waited >= max_wait:
            return round(waited, 1), round(load, 2)


# ---------------------------------------------------------------------------------------------------------------
# Child side: one (configuration, method) in its own process
# ---------------------------------------------------------------------------------------------------------------


class _PhaseTimer:
    """Accumulates wall time per phase name within one step (CPU ops are synchronous, so perf_counter is exact)."""

    def __init__(self) -> None:
        self.current: dict[str, float] = {}

    def reset(self) -> None:
        self.current = dict.fromkeys(PHASES, 0.0)

    def add(self, name: str, seconds: float) -> None:
        self.current[name] = self.current.get(name, 0.0) + seconds

    def wrap(self, fn, name: str, subtract: str | None = None):
        """``fn`` timed into ``name``; time spent in phase ``subtract`` during the call is not counted twice."""

        def timed(*args, **kwargs):
            inner0 = self.current.get(subtract, 0.0) if subtract else 0.0
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                inner = (self.current.get(subtract, 0.0) - inner0) if subtract else 0.0
                self.add(name, time.perf_counter() - t0 - inner)

        return timed


def run_case(case: dict) -> dict:
    """Build the model, optimiser and batch of ``case``; time its training steps; return the measurements."""
    t_start = time.perf_counter()
    import torch

    import dora_lightning.module as module_lib
    from dora_lightning.core.ema import ema_update_
    from dora_lightning.core.loss import teacher_entropy, update_center
    from dora_lightning.module import DoRAModule, per_parameter_clip_

    torch.set_num_threads(case["threads"])
    import_s = time.perf_counter() - t_start
    rss_imports = _rss_kib()

    torch.manual_seed(case["seed"])
    t0 = time.perf_counter()
    model = DoRAModule(
        backbone=case["backbone"],
        img_size=case["img_size"],
        out_dim=case["out_dim"],
        head_hidden_dim=case["head_hidden_dim"],
        head_bottleneck_dim=case["head_bottleneck_dim"],
        norm_last_layer=False,
        drop_path_rate=case["drop_path_rate"],
        num_objects=case["num_objects"],
        method=case["method"],
        clip_grad=case["clip_grad"],
        batch_size=case["batch_size"],
        seed=case["seed"],
        **case["overrides"],
    )
    model.train()
    optimizer = model.configure_optimizers()
    for index, group in enumerate(optimizer.param_groups):
        group["lr"] = case["lr"]
        if index == 0:
            group["weight_decay"] = case["weight_decay"]
    clip_params = [p for g in optimizer.param_groups for p in g["params"]]
    teacher_params, student_params = list(model.teacher.parameters()), list(model.student.parameters())

    b, t, size, local = case["batch_size"], case["frames"], case["img_size"], case["local_size"]
    n_global = 2 if case["method"] == "dino" else 1
    batch = {
        "global_views": [torch.randn(b, t, 3, size, size) for _ in range(n_global)],
        "local_views": [torch.randn(b, t, 3, local, local) for _ in range(case["local_crops"])],
    }
    model._check_batch(batch)
    build_s = time.perf_counter() - t0
    rss_built = _rss_kib()

    # phase timers around the module's own methods (instance attributes; the module's code is unchanged)
    timer = _PhaseTimer()
    model._student_logits = timer.wrap(model._student_logits, "student_fwd")
    model._teacher_logits = timer.wrap(model._teacher_logits, "teacher_fwd")
    model._track = timer.wrap(model._track, "teacher_fwd", subtract="tracker")
    module_lib.track_objects = timer.wrap(module_lib.track_objects, "tracker")

    def step() -> tuple[float, dict[str, float]]:
        timer.reset()
        s0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        s1 = time.perf_counter()
        timer.add("zero_grad", s1 - s0)
        parts, teacher, tracked = model.compute_loss(batch, case["teacher_temp"])
        if not torch.isfinite(parts.total):
            raise FloatingPointError(f"non-finite loss {parts.total.item()}")
        with torch.no_grad():
            teacher_entropy(teacher, model.center, case["teacher_temp"])
            model.center.copy_(update_center(model.center, teacher.flatten(0, -2), 0.9))
        s2 = time.perf_counter()
        forward_parts = timer.current["teacher_fwd"] + timer.current["tracker"] + timer.current["student_fwd"]
        timer.add("loss_and_center", (s2 - s1) - forward_parts)
        # the teacher side must carry no graph
        assert not teacher.requires_grad and teacher.grad_fn is None, "teacher logits carry a graph"
        if tracked is not None:
            assert not tracked.masked.requires_grad, "masked views carry a graph"
        assert model.training and model.student.training, "model not in train mode"
        parts.total.backward()
        s3 = time.perf_counter()
        timer.add("backward", s3 - s2)
        per_parameter_clip_(clip_params, case["clip_grad"])
        s4 = time.perf_counter()
        timer.add("clip", s4 - s3)
        optimizer.step()
        s5 = time.perf_counter()
        timer.add("adamw", s5 - s4)
        ema_update_(teacher_params, student_params, case["momentum"])
        s6 = time.perf_counter()
        timer.add("ema", s6 - s5)
        return s6 - s0, dict(timer.current)

    warmup_times = []
    for _ in range(case["warmup"]):
        warmup_times.append(step()[0])
    assert all(p.grad is None for p in model.teacher.parameters()), "a teacher parameter received a gradient"

    # Timed steps. On a shared machine another process on one of the 2 cores stalls every parallel op (the OpenMP
    # barrier waits for a descheduled thread), which can make a step 10x slower; each step's CPU use by OTHER
    # processes is measured, and up to ``max_extra_steps`` more steps run until ``steps`` quiet ones are collected.
    times: list[float] = []
    phases: list[dict[str, float]] = []
    other_load: list[float] = []
    own_load: list[float] = []
    rss_after_steps: list[float] = []
    threshold = case["busy_threshold"]
    while len(times) < case["steps"] + case["max_extra_steps"]:
        busy0, own0, wall0 = _cpu_busy_seconds(), _own_cpu_seconds(), time.monotonic()
        seconds, phase = step()
        busy1, own1, wall1 = _cpu_busy_seconds(), _own_cpu_seconds(), time.monotonic()
        window = max(wall1 - wall0, 1e-9)
        times.append(seconds)
        phases.append(phase)
        own_load.append(round((own1 - own0) / window, 2))
        other_load.append(round(max(0.0, (busy1 - busy0) - (own1 - own0)) / window, 2))
        rss_after_steps.append(_gb(_rss_kib()))
        if sum(x <= threshold for x in other_load) >= case["steps"]:
            break
    peak = _max_rss_kib()
    quiet = [i for i, x in enumerate(other_load) if x <= threshold]
    used = quiet if quiet else list(range(len(times)))

    return {
        "torch_threads": torch.get_num_threads(),
        "import_s": round(import_s, 2),
        "build_s": round(build_s, 2),
        "warmup_step_s": [round(x, 3) for x in warmup_times],
        "step_s": [round(x, 3) for x in times],
        "other_cpu_cores_per_step": other_load,
        "own_cpu_cores_per_step": own_load,
        "quiet_steps": len(quiet),
        "busy": len(quiet) < case["steps"],
        "step_median_s": round(statistics.median(times[i] for i in used), 3),
        "step_min_s": round(min(times[i] for i in used), 3),
        "step_mean_s": round(statistics.fmean(times[i] for i in used), 3),
        "step_median_all_s": round(statistics.median(times), 3),
        "phase_median_s": {k: round(statistics.median(phases[i][k] for i in used), 3) for k in PHASES},
        "rss_after_imports_gb": _gb(rss_imports),
        "rss_after_build_gb": _gb(rss_built),
        "rss_after_each_step_gb": rss_after_steps,
        "peak_rss_gb": _gb(peak),
        "peak_minus_imports_gb": _gb(peak - rss_imports),
        "params_student_m": round(sum(p.numel() for p in student_params) / 1e6, 2),
        "own_cpu_cores": round(statistics.fmean(own_load[i] for i in used), 2),
        "other_cpu_cores": round(statistics.fmean(other_load[i] for i in used), 2),
    }


# ---------------------------------------------------------------------------------------------------------------
# Parent side
# ---------------------------------------------------------------------------------------------------------------


def machine_info() -> dict:
    cpu_model = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu_model = next(
                (ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu_model
            )
    except OSError:
        pass
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
    return {
        "platform": platform.platform(),
        "cpu": cpu_model,
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        **versions,
    }


def run_case_in_subprocess(case: dict, timeout: float) -> dict:
    """Run one case in a fresh interpreter, so that each peak RSS is its own."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--child-case",
            json.dumps(case),
            "--child-out",
            str(out),
        ]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH", "")]))
        wall0 = time.monotonic()
        try:
            rc = subprocess.run(cmd, cwd=str(REPO_ROOT), env=env, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
        if rc != 0 or not out.is_file():
            raise RuntimeError(f"benchmark case {case['config']}/{case['method']} failed (exit {rc})")
        result = json.loads(out.read_text())
    result["case_wall_s"] = round(time.monotonic() - wall0, 1)
    return result


def _fmt_ratio(value: float | None, official: float | None) -> str:
    if value is None or not official:
        return "-"
    ratio = value / official
    return f"{ratio:.2f}x {'ok' if ratio <= TARGET_RATIO else 'MISS'}"


def markdown_table(results: list[dict]) -> str:
    by_key = {(r["config"], r["method"]): r for r in results}
    lines = [
        "| config | method | step time, median (s) | vs official | peak RSS (GB) | vs official | "
        "RSS after imports (GB) | peak - imports (GB) | DoRA/DINO | other CPU load, timed steps (cores) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        official = OFFICIAL.get(r["config"], {}) if r["method"] == "dora" else {}
        ratio = "-"
        if r["method"] == "dora" and (r["config"], "dino") in by_key:
            ratio = f"{r['step_median_s'] / by_key[(r['config'], 'dino')]['step_median_s']:.2f}x"
        lines.append(
            f"| {r['config']} ({r['backbone']}, T={r['frames']}) | {r['method']} | {r['step_median_s']:.2f} | "
            f"{_fmt_ratio(r['step_median_s'], official.get('step_s'))} | {r['peak_rss_gb']:.2f} | "
            f"{_fmt_ratio(r['peak_rss_gb'], official.get('peak_gb'))} | {r['rss_after_imports_gb']:.2f} | "
            f"{r['peak_minus_imports_gb']:.2f} | {ratio} | {r['other_cpu_cores']:.2f}"
            f"{' BUSY' if r['busy'] else ''} |"
        )
    return "\n".join(lines)


def phase_table(results: list[dict]) -> str:
    lines = [
        "| config | method | " + " | ".join(PHASES) + " |",
        "|---|---|" + "---|" * len(PHASES),
    ]
    for r in results:
        cells = " | ".join(f"{r['phase_median_s'][k]:.2f}" for k in PHASES)
        lines.append(f"| {r['config']} | {r['method']} | {cells} |")
    return "\n".join(lines)


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
    p.add_argument(
        "--quiet-wait",
        type=float,
        default=300,
        help="before each case, wait up to this many seconds for other processes to leave the CPUs idle (0: no wait)",
    )
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
    p.add_argument("--child-case", help=argparse.SUPPRESS)
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.child_case:
        result = run_case(json.loads(args.child_case))
        Path(args.child_out).write_text(json.dumps(result))
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
            waited, load = (
                wait_for_quiet(args.quiet_wait, args.busy_threshold) if args.quiet_wait > 0 else (0.0, None)
            )
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

    table, phases = markdown_table(results), phase_table(results)
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
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
