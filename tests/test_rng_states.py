"""The RNG states of a `dora fit` checkpoint: one CUDA state, of the process's own device, restored on that device."""

from __future__ import annotations

import torch

from dora_lightning.rng_states import capture_rng_states, restore_rng_states


def test_a_cpu_run_saves_no_cuda_state_and_restores_its_draws():
    states = capture_rng_states(torch.device("cpu"))
    assert states["cuda_rng"] is None
    first = torch.rand(5)
    restore_rng_states(states, torch.device("cpu"))
    assert torch.equal(torch.rand(5), first)


class _FakeCuda:
    """Stands in for torch.cuda's generator functions on a machine without a GPU; records what is set where."""

    def __init__(self, devices: int) -> None:
        self.states = {i: torch.tensor([i], dtype=torch.uint8) for i in range(devices)}
        self.set: list[tuple[list[int], int]] = []

    def get_rng_state(self, device="cuda"):
        return self.states[torch.device(device).index or 0].clone()

    def set_rng_state(self, state, device="cuda"):
        index = torch.device(device).index or 0
        if index not in self.states:
            raise IndexError("tuple index out of range")  # what torch.cuda.default_generators[index] raises
        self.set.append((state.tolist(), index))


def test_each_process_restores_process_zeros_state_on_its_own_device_only(monkeypatch):
    """An 8-GPU run resumed on 4: every process sets the one saved state on its own device; nothing is set on
    devices it does not train on (before: all 8 saved states were set, and device 4 did not exist)."""
    saved_on_eight = _FakeCuda(8)
    monkeypatch.setattr(torch.cuda, "get_rng_state", saved_on_eight.get_rng_state)
    states = capture_rng_states(torch.device("cuda", 0))  # process 0 writes the checkpoint
    assert states["cuda_rng"].tolist() == [0]

    resumed_on_four = _FakeCuda(4)
    monkeypatch.setattr(torch.cuda, "set_rng_state", resumed_on_four.set_rng_state)
    for rank in range(4):
        restore_rng_states(states, torch.device("cuda", rank))
    assert resumed_on_four.set == [([0], 0), ([0], 1), ([0], 2), ([0], 3)]


def test_a_checkpoint_with_a_state_per_visible_device_gives_its_first(monkeypatch):
    """Checkpoints written before 2026-12-06 hold torch.cuda.get_rng_state_all() of process 0."""
    fake = _FakeCuda(2)
    monkeypatch.setattr(torch.cuda, "set_rng_state", fake.set_rng_state)
    old = {"torch_rng": torch.get_rng_state(), "cuda_rng": [torch.tensor([7], dtype=torch.uint8)] * 8}
    restore_rng_states(old, torch.device("cuda", 1))
    assert fake.set == [([7], 1)]
    restore_rng_states({"torch_rng": torch.get_rng_state(), "cuda_rng": []}, torch.device("cuda", 0))
    assert len(fake.set) == 1  # a CPU run's old checkpoint (an empty list) sets nothing


def test_a_gpu_checkpoint_resumed_on_the_cpu_leaves_cuda_alone(monkeypatch):
    def no_cuda(*args, **kwargs):
        raise AssertionError("CUDA touched in a CPU run")

    monkeypatch.setattr(torch.cuda, "set_rng_state", no_cuda)
    monkeypatch.setattr(torch.cuda, "get_rng_state", no_cuda)
    states = {"torch_rng": torch.get_rng_state(), "cuda_rng": torch.tensor([3], dtype=torch.uint8)}
    restore_rng_states(states, torch.device("cpu"))
    assert capture_rng_states(torch.device("cpu"))["cuda_rng"] is None
