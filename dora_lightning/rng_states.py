"""The random-number states a `dora fit` checkpoint carries, so that a resume draws the same drop-path masks.

Process 0 writes the checkpoint and every process resumes from it. Every process is seeded alike
(``seed_everything``) and makes the same draws, so process 0's states are every process's: the CPU generator's and
the generator of the one CUDA device the process trains on (``torch.cuda.get_rng_state(device)``). Checkpoints
written before 2026-12-06 hold ``torch.cuda.get_rng_state_all()`` of process 0, one state per visible device; their
first entry (device 0, where process 0 trains on a usual machine) is taken. Saving a state per visible device and
restoring all of them, as before, restored process 0's untouched copies of the other devices' generators in processes
1 and up (a drop-path stream that restarted), and failed with an IndexError on a machine with fewer GPUs.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["capture_rng_states", "restore_rng_states"]


def capture_rng_states(device: torch.device) -> dict[str, Any]:
    """``{"torch_rng": CPU state, "cuda_rng": state of ``device``'s generator, or None off CUDA}``. A CPU run never
    touches CUDA (DataLoader workers forked later must not find it initialised)."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return {"torch_rng": torch.get_rng_state(), "cuda_rng": cuda}


def restore_rng_states(states: dict[str, Any], device: torch.device) -> None:
    """Set the CPU generator and, on CUDA, ``device``'s generator to what :func:`capture_rng_states` saved (a
    checkpoint of a CPU run leaves the CUDA generator alone, and a GPU run's leaves nothing else on a CPU run)."""
    torch.set_rng_state(states["torch_rng"])
    cuda = _one_device_state(states.get("cuda_rng"))
    if cuda is not None and device.type == "cuda":
        torch.cuda.set_rng_state(cuda, device)


def _one_device_state(saved: Tensor | list[Tensor] | None) -> Tensor | None:
    if isinstance(saved, (list, tuple)):  # before 2026-12-06: one state per visible device
        return saved[0] if saved else None
    return saved
