"""bench_gpu.py's child side: one part (bare step, Lightning overhead, or ``dora fit`` with the real loader), run in its
own process on the device it names, through the project's public seams only: ``DoRAModule`` (its
``configure_optimizers``, ``compute_loss``, ``training_step`` via the Trainer), ``pl.Trainer`` and
``VideoClipDataModule``."""

from __future__ import annotations

import contextlib
import statistics
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks.common import REPO_ROOT, wt_settings

# profiler events that make the host wait for the device (or, on the CPU, read a tensor's value into Python)
SYNC_EVENTS = (
    "cudaStreamSynchronize",
    "cudaDeviceSynchronize",
    "cudaEventSynchronize",
)


def build_module(case: dict):
    """A DoRAModule with the case's model arguments (wt.yaml's, overridden by ``case["model"]``)."""
    from dora_lightning.module import DoRAModule

    model, _, _ = wt_settings()
    return DoRAModule(**(model | {"batch_size": case["batch_size"]} | case.get("model", {})))


def synthetic_batch(case: dict, method: str, device: Any) -> dict:
    """Normalised random views shaped like VideoClipDataModule's batches (after its on_after_batch_transfer)."""

    b, t, g, lo = case["batch_size"], case["frames"], case["global_size"], case["local_size"]
    return {
        "global_views": [
            torch.randn(b, t, 3, g, g, device=device) for _ in range(2 if method == "dino" else 1)
        ],
        "local_views": [torch.randn(b, t, 3, lo, lo, device=device) for _ in range(case["local_crops"])],
    }


def _autocast(device: Any, precision: str):
    if precision.startswith("bf16"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def sync_device(device: Any) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clock(device: Any) -> float:
    """Seconds for timing steps: wall time on a GPU; this process's CPU time on the CPU (with one thread, so that
    other processes on a shared machine do not count)."""
    return time.perf_counter() if device.type == "cuda" else time.process_time()


def peak_gib(device: Any) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


class BareStep:
    """One optimiser step without Lightning: zero_grad, forward + loss (autocast as Lightning's precision plugin
    does), centre update, backward, per-parameter clip, AdamW, EMA; no logging, no checks, no host syncs."""

    def __init__(self, module, device: Any, precision: str) -> None:
        from dora_lightning.core.loss import teacher_entropy, update_center

        self.module, self.device, self.precision = module, device, precision
        self.optimizer = module.configure_optimizers()
        for group in self.optimizer.param_groups:
            group["lr"] = 1e-4
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.teacher, self.student = list(module.teacher.parameters()), list(module.student.parameters())
        self._entropy, self._center = teacher_entropy, update_center

    def __call__(self, batch: dict, phase: Any = None) -> None:
        """One step; ``phase(name)``, if given, is a context manager around each of its parts (count_ops.py)."""
        import torch

        from dora_lightning.core.ema import ema_update_
        from dora_lightning.module import per_parameter_clip_

        phase = phase or (lambda name: contextlib.nullcontext())
        hp = self.module.hparams
        with phase("zero_grad, loss"):
            self.optimizer.zero_grad(set_to_none=True)
        with _autocast(self.device, self.precision):
            with phase("zero_grad, loss"):
                parts, teacher, _ = self.module.compute_loss(batch, hp.teacher_temp)
            with phase("centre, entropy"), torch.no_grad():
                self._entropy(teacher, self.module.center, hp.teacher_temp)
                self.module.center.copy_(self._center(self.module.center, teacher.flatten(0, -2), 0.9))
        with phase("backward"):
            parts.total.backward()
        with phase("gradient clip"):
            per_parameter_clip_(self.params, hp.clip_grad)
        with phase("AdamW (CPU: per parameter; CUDA: fused)"):
            self.optimizer.step()
        with phase("EMA"):
            ema_update_(self.teacher, self.student, hp.momentum_teacher)


def step_flops(step: BareStep, batch: dict) -> int:
    """FLOPs of one training step (forward and backward of teacher, tracker and student; matmuls and convolutions, as
    torch.utils.flop_counter counts them), measured by running one step under the counter."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step(batch)
    return int(counter.get_total_flops())


class ScalarReads(TorchDispatchMode):
    """Counts reads of a tensor's value into Python (``aten::_local_scalar_dense``: ``.item()``, ``bool(t)``,
    ``float(t)``), each by the nearest caller outside torch. On a GPU such a read of a device tensor waits for the
    device to finish all queued work; the optimiser's step counters are CPU tensors on every device (no wait)."""

    OPTIMISER = "torch.optim step counters (CPU tensors on every device: no device sync)"

    def __init__(self) -> None:
        super().__init__()
        self.origins: Counter[str] = Counter()  # value reads by origin
        self.numbers: Counter[str] = (
            Counter()
        )  # torch.tensor(number) by origin: a blocking host-to-device copy on a GPU

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.origins[self._origin()] += 1
        elif func is torch.ops.aten.lift_fresh.default:
            self.numbers[self._origin()] += 1
        return func(*args, **(kwargs or {}))

    def _origin(self) -> str:
        for frame in reversed(traceback.extract_stack()[:-2]):
            name = frame.filename.replace("\\", "/")
            if "/torch/optim/" in name:
                return self.OPTIMISER
            if "/torch/" not in name and not name.endswith("gpu_cases.py"):
                short = name.split("site-packages/")[-1].split(str(REPO_ROOT) + "/")[-1]
                return f"{short}:{frame.lineno}"
        return "torch"


class Probe:
    """torch.profiler plus ScalarReads over a window of steps; ``summary(steps)`` gives the counts per step.

    On a GPU each value read of a device tensor and each number turned into a device tensor waits for the device;
    on the CPU (the smoke run) they show where a GPU run would wait, by origin."""

    def __init__(self, device: Any) -> None:
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        self.profile, self.reads = profile(activities=activities), ScalarReads()

    def __enter__(self) -> Probe:
        self.profile.__enter__()
        self.reads.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.reads.__exit__(*exc)
        self.profile.__exit__(*exc)

    def summary(self, steps: int) -> dict:
        """Per step: device syncs (value reads that wait for a GPU), every value read by origin, profiler events."""
        counts = dict.fromkeys(SYNC_EVENTS, 0)
        for event in self.profile.key_averages():
            if event.key in counts:
                counts[event.key] += event.count
        optimiser = self.reads.origins[ScalarReads.OPTIMISER]
        return {
            "value_reads_outside_optimiser_per_step": round(
                (self.reads.origins.total() - optimiser) / steps, 2
            ),
            "numbers_to_tensors_per_step": round(self.reads.numbers.total() / steps, 2),
            "value_reads_per_step": {k: round(v / steps, 2) for k, v in self.reads.origins.most_common()},
            "numbers_to_tensors_by_origin": {
                k: round(v / steps, 2) for k, v in self.reads.numbers.most_common()
            },
            "profiler_events_per_step": {k: round(v / steps, 2) for k, v in counts.items()},
        }


def compiled_regions(module) -> int:
    """How many of the module's submodules are compiled in place (``nn.Module.compile``: the blocks and heads that
    ``model.compile`` compiles)."""
    return sum(getattr(m, "_compiled_call_impl", None) is not None for m in module.modules())


def _graphs() -> int:
    """Graphs dynamo has compiled in this process so far."""
    from torch._dynamo.utils import counters

    return int(counters["stats"].get("unique_graphs", 0))


def time_bare(case: dict, method: str) -> dict:
    """Bare-step time, clips/s, FLOPs, TFLOP/s, peak memory and host syncs per step for one method.

    With ``model.compile`` the module compiles its blocks and heads here (``configure_model``, the hook that only a
    Trainer calls otherwise); the warm-up steps pay for the compilation (``warmup_s``), and ``graphs_compiled_timed``
    says whether a timed step compiled anything (it should be 0). The FLOP-counting and profiled steps run under a
    dispatch mode, in which dynamo runs frames eagerly: their counts are the eager step's."""

    device = torch.device(case["device"])
    torch.manual_seed(0)
    module = build_module(case | {"model": case.get("model", {}) | {"method": method}})
    compile_ = bool(module.hparams.get("compile"))
    if compile_ and case.get(
        "compile_backend"
    ):  # the smoke run: dynamo's eager backend (seconds, not minutes)
        from dora_lightning.models.compile import compile_regions_

        compile_regions_(module.student, module.teacher, backend=case["compile_backend"])
    elif compile_:
        module.configure_model()  # what the Trainer calls: model.compile's blocks and heads, with inductor
    module = module.to(device).train()
    batch = synthetic_batch(case, method, device)
    step = BareStep(module, device, case["precision"])
    t_warm = time.perf_counter()
    for _ in range(case["warmup"]):
        step(batch)
    sync_device(device)
    warmup_s = time.perf_counter() - t_warm
    flops = step_flops(step, batch)
    sync_device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    graphs = _graphs()
    times = []
    for _ in range(case["steps"]):
        t0 = clock(device)
        step(batch)
        sync_device(device)
        times.append(clock(device) - t0)
    graphs_timed = _graphs() - graphs
    with Probe(device) as probe:
        for _ in range(case["profiled_steps"]):
            step(batch)
        sync_device(device)
    median = statistics.median(times)
    return {
        "method": method,
        "batch_size": case["batch_size"],
        "step_ms": round(median * 1e3, 2),
        "clips_per_s": round(case["batch_size"] / median, 2),
        "flops_per_step": flops,
        "tflops_per_s": round(flops / median / 1e12, 3),
        "peak_gib": peak_gib(device),
        "compile": compile_,
        "compile_backend": (case.get("compile_backend") or "inductor") if compile_ else None,
        "compiled_regions": compiled_regions(module),
        "warmup_steps": case["warmup"],
        "warmup_s": round(warmup_s, 1),
        "graphs_compiled_timed": graphs_timed,
        **probe.summary(case["profiled_steps"]),
    }


def run_bare(case: dict) -> dict:
    """The bare step for each of ``case["methods"]``."""
    return {"results": [time_bare(case, method) for method in case["methods"]]}


def run_overhead(case: dict) -> dict:
    """Lightning's cost (:func:`benchmarks.trainer_gpu_cases.run_overhead`)."""
    from benchmarks.trainer_gpu_cases import run_overhead as run

    return run(case)


def run_fit(case: dict) -> dict:
    """``dora fit`` with the real loader (:func:`benchmarks.trainer_gpu_cases.run_fit`)."""
    from benchmarks.trainer_gpu_cases import run_fit as run

    return run(case)


PARTS = {"bare": run_bare, "overhead": run_overhead, "fit": run_fit}


def run_case(case: dict) -> dict:
    """Entry point of the child process: run ``case["part"]``."""

    if Path(case.get("video") or ".").suffix == ".mp4" and not Path(case["video"]).is_file():
        raise FileNotFoundError(case["video"])
    if case["device"] == "cpu":
        torch.set_num_threads(case.get("threads", 1))
    return PARTS[case["part"]](case)
