"""bench_step.py's child side: one (configuration, method) case, run in its own process. Builds the model, optimiser
and a random batch, then times training steps phase by phase, measuring memory and the CPU load of other processes
per step."""

from __future__ import annotations

import resource
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager

from benchmarks.common import CpuSample, cpu_cores_between, read_proc_kib

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


def _rss_kib() -> int:
    """Current resident set size of this process in KiB (VmRSS)."""
    return read_proc_kib("/proc/self/status", "VmRSS:")


def _max_rss_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def _gb(kib: float) -> float:
    return round(kib / 1024**2, 3)


class _PhaseTimer:
    """Accumulates wall time per phase name within one step (CPU ops are synchronous, so perf_counter is exact)."""

    def __init__(self) -> None:
        self.current: dict[str, float] = {}

    def reset(self) -> None:
        self.current = dict.fromkeys(PHASES, 0.0)

    def add(self, name: str, seconds: float) -> None:
        self.current[name] = self.current.get(name, 0.0) + seconds

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the block into phase ``name`` (the module's public ``phase_timer`` hook calls this)."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - t0)


def run_case(case: dict) -> dict:
    """Build the model, optimiser and batch of ``case``; time its training steps; return the measurements."""
    t_start = time.perf_counter()
    import torch

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
        grad_checkpointing=case.get("grad_checkpointing", False),
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
    model.check_batch(batch)
    build_s = time.perf_counter() - t0
    rss_built = _rss_kib()

    # the module times its own phases (teacher_fwd, tracker, student_fwd) through its public phase_timer hook
    timer = _PhaseTimer()
    model.phase_timer = timer

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
        start = CpuSample.now(include_children=False)
        seconds, phase = step()
        own, other = cpu_cores_between(start, CpuSample.now(include_children=False))
        times.append(seconds)
        phases.append(phase)
        own_load.append(round(own, 2))
        other_load.append(round(other, 2))
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
