"""Write an evaluation's metrics with everything needed to reproduce and compare them (spec G.7).

``results_<name>.json`` holds the metrics, the protocol settings, the checkpoint (path, size, sha256; the backbone's
architecture when known), what it ran on (precision, devices, hardware), package versions, the date and the command
line.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import math
import os
import platform
import shlex
import sys
from collections.abc import Mapping, Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from dora_lightning.checkpoint_formats import file_sha256

__all__ = [
    "PACKAGES",
    "file_sha256",
    "format_table",
    "format_value",
    "package_versions",
    "trainer_settings",
    "write_results",
]

PACKAGES = ("torch", "torchvision", "timm", "lightning", "torchmetrics", "dora-lightning")


def package_versions(packages: Sequence[str] = PACKAGES) -> dict[str, str]:
    """Installed versions of ``packages`` (``"not installed"`` when missing), plus Python's."""
    versions = {"python": platform.python_version()}
    for name in packages:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def _jsonable(value: Any) -> Any:
    """JSON-friendly copy: paths and other objects as strings, tuples as lists, non-finite floats as strings."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _jsonable(dataclasses.asdict(value))
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if hasattr(value, "item") and callable(value.item):  # 0-d tensors and numpy scalars
        try:
            return _jsonable(value.item())
        except (TypeError, ValueError, RuntimeError):
            pass
    return str(value)


def trainer_settings(trainer_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """What an evaluation ran on, for its results file: the Trainer's precision, accelerator, devices, nodes and
    strategy (Lightning's defaults where not given), and the hardware (the CUDA device's name when a GPU can run it,
    else the CPU architecture); a bf16 or fp16 evaluation scores slightly differently from a float32 one."""
    import torch

    def given(key: str, default: Any) -> Any:
        value = trainer_kwargs.get(key)
        return default if value is None else value

    settings = {
        "precision": str(given("precision", "32-true")),
        "accelerator": str(given("accelerator", "auto")),
        "devices": given("devices", "auto"),
        "num_nodes": given("num_nodes", 1),
        "strategy": str(given("strategy", "auto")),
    }
    on_cpu = settings["accelerator"] == "cpu" or not torch.cuda.is_available()
    settings["hardware"] = f"cpu ({platform.machine()})" if on_cpu else torch.cuda.get_device_name()
    return _jsonable(settings)


def write_results(
    output_dir: str | Path,
    evaluator_name: str,
    metrics: Mapping[str, float],
    protocol: Mapping[str, Any],
    checkpoint_path: str | Path,
    *,
    backbone: Any = None,
    command: Sequence[str] | None = None,
    trainer: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``output_dir/results_<evaluator_name>.json`` (atomically) and return its path.

    Args:
        output_dir: created if missing.
        evaluator_name: short name of the evaluator (``knn``).
        metrics: ``{name: value}``.
        protocol: the evaluator's :meth:`~dora_lightning.evaluation.contract.Evaluator.protocol`.
        checkpoint_path: the evaluated checkpoint; its sha256 and size are recorded: those ``backbone`` took when
            it read the file, else the file's now.
        backbone: optional :class:`~dora_lightning.checkpoints.BackboneInfo` (or a dict) of the loaded backbone.
        command: the command line; default ``sys.argv``.
        trainer: optional :func:`trainer_settings` of the run (precision, devices, hardware).
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = Path(checkpoint_path)
    argv = list(command) if command is not None else list(sys.argv)
    described = _jsonable(backbone) if backbone is not None else {}
    read = {key: described.pop(key) for key in ("size_bytes", "sha256") if key in described}
    payload: dict[str, Any] = {
        "evaluator": evaluator_name,
        "metrics": {str(k): float(v) for k, v in metrics.items()},
        "protocol": _jsonable(dict(protocol)),
        "checkpoint": {
            "path": str(ckpt.resolve()),
            "size_bytes": read["size_bytes"] if "size_bytes" in read else ckpt.stat().st_size,
            "sha256": read["sha256"] if "sha256" in read else file_sha256(ckpt),
        },
        "versions": package_versions(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(argv),
        "cwd": str(Path.cwd()),
    }
    if backbone is not None:
        payload["backbone"] = described
    if trainer is not None:
        payload["trainer"] = _jsonable(dict(trainer))
    path = out / f"results_{evaluator_name}.json"
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    os.replace(partial, path)
    return path


def format_value(value: float) -> str:
    """A metric for people: 2 decimals when its size is >= 1 (accuracies in %), else 4 significant digits (an lr
    of 0.001 stays 0.001, not 0.00)."""
    value = float(value)
    if not math.isfinite(value):
        return str(value)
    return f"{value:.2f}" if abs(value) >= 1 or value == 0 else f"{value:.4g}"


def format_table(metrics: Mapping[str, float], title: str | None = None) -> str:
    """A plain-text two-column table of ``metrics`` (values as :func:`format_value` writes them)."""
    rows = [(str(k), format_value(v)) for k, v in metrics.items()]
    head = ("metric", "value")
    width_k = max([len(head[0]), *(len(k) for k, _ in rows)])
    width_v = max([len(head[1]), *(len(v) for _, v in rows)])
    rule = f"+-{'-' * width_k}-+-{'-' * width_v}-+"
    lines = [] if title is None else [title]
    lines += [rule, f"| {head[0]:<{width_k}} | {head[1]:>{width_v}} |", rule]
    lines += [f"| {k:<{width_k}} | {v:>{width_v}} |" for k, v in rows]
    lines.append(rule)
    return "\n".join(lines)
