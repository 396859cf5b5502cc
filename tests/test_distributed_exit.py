"""Importing dora_lightning makes a process destroy its torch.distributed group at exit (gloo included)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SCRIPT = """
import atexit
import torch
import torch.distributed as dist

atexit.register(lambda: print("initialized at exit:", dist.is_initialized(), flush=True))  # runs after later hooks
import dora_lightning  # noqa: E402,F401

dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
tensor = torch.ones(3)
dist.all_reduce(tensor)
print("reduced:", tensor.tolist(), flush=True)
"""


def test_gloo_process_group_is_destroyed_before_python_finalises() -> None:
    """The exit hook runs (LIFO: before hooks registered earlier) and leaves no group for finalisation to race."""
    run = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "reduced: [1.0, 1.0, 1.0]" in run.stdout
    assert "initialized at exit: False" in run.stdout
