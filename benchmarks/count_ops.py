"""Operator calls per training step, by phase: what a GPU would launch one kernel (or a few) for each.

On a GPU every aten operator that computes is at least one kernel launch, a few microseconds of host time; a step
whose launches take longer than the device's work leaves the GPU idle however little the loop adds. This counts them
on the CPU (the count does not depend on the device, except the optimiser: PyTorch's AdamW runs one operator per
parameter and state on the CPU, one fused kernel for all parameters on CUDA) for configs/wt.yaml's model structure
(ViT-S/16, T=8, 6 local crops) at small image sizes, one step of bench_gpu.py's ``BareStep`` with each phase
counted apart: the module's own phases come from its public ``phase_timer`` hook.

Usage::

    python benchmarks/count_ops.py [--method dora|dino] [--batch-size 2]
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from benchmarks.gpu_cases import BareStep, build_module, synthetic_batch  # noqa: E402

# operators that only make a new view of a tensor's memory (no kernel)
VIEW_OPS = {
    "alias", "as_strided", "chunk", "detach", "expand", "flatten", "lift_fresh", "narrow", "permute", "reshape",
    "select", "slice", "split", "split_with_sizes", "squeeze", "t", "transpose", "unbind", "unflatten",
    "unsqueeze", "view", "_unsafe_view",
}  # fmt: skip


class OperatorCount(TorchDispatchMode):
    """Counts the computing aten operators dispatched, by the phase set in :meth:`phase`."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()
        self.current = "other"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.split(".")[0] not in VIEW_OPS:
            self.counts[self.current] += 1
        return func(*args, **(kwargs or {}))

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Count what runs inside under ``name`` (also the DoRAModule ``phase_timer`` protocol)."""
        previous, self.current = self.current, name
        try:
            yield
        finally:
            self.current = previous


def count_step(method: str, batch_size: int) -> Counter[str]:
    """Operator calls of one bare step after one warm-up step, by phase."""
    case = dict(frames=8, global_size=32, local_size=16, local_crops=6, batch_size=batch_size)
    case["model"] = dict(img_size=32, out_dim=4096, method=method)
    torch.manual_seed(0)
    module = build_module(case).train()
    batch = synthetic_batch(case, method, "cpu")
    step = BareStep(module, torch.device("cpu"), "32-true")
    step(batch)
    counter = OperatorCount()
    module.phase_timer = counter  # the module's own phases: teacher_fwd, tracker, student_fwd
    with counter:
        step(batch, phase=counter.phase)
    module.phase_timer = None
    return counter.counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--method", choices=("dora", "dino"), default="dora")
    parser.add_argument("--batch-size", type=int, default=2)
    args = parser.parse_args(argv)
    counts = count_step(args.method, args.batch_size)
    optimiser = sum(n for phase, n in counts.items() if phase.startswith("AdamW"))
    for phase, n in counts.items():
        print(f"{phase:45s} {n:6d}")
    print(
        f"{'total':45s} {sum(counts.values()):6d}   without the optimiser: {sum(counts.values()) - optimiser}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
