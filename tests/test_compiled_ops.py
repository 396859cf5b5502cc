"""Tests for dora_lightning.data.augment.compiled: the compiled kernels equal the eager math; a compile failure falls back
with one warning."""

from __future__ import annotations

import warnings

import pytest
import torch

from dora_lightning.data.augment.blur import gaussian_blur
from dora_lightning.data.augment.colour_ops import colour_map_rgbx_uint8, colour_map_uint8, colour_matrix
from dora_lightning.data.augment.compiled import (
    CompiledFunction,
    compiled_blur_uint8,
    compiled_colour_map_rgbx_uint8,
    compiled_colour_map_uint8,
)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _maps(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    u = torch.rand(n, 5, generator=gen(seed))
    return colour_matrix(
        0.6 + 0.8 * u[:, 0], 0.6 + 0.8 * u[:, 1], 0.8 + 0.4 * u[:, 2], 0.2 * u[:, 3] - 0.1, u[:, 4] < 0.3
    )


@pytest.mark.parametrize("shape", [(7, 3, 24, 24), (3, 3, 16, 20), (1, 3, 8, 8)])
def test_compiled_colour_map_equals_eager(shape):
    views = torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen(shape[0]))
    matrix, mean_coef = _maps(shape[0], shape[2])
    out = compiled_colour_map_uint8(views, matrix, mean_coef)
    assert compiled_colour_map_uint8.failure is None, compiled_colour_map_uint8.failure
    assert out.dtype == torch.uint8 and out.shape == views.shape
    assert (out.int() - colour_map_uint8(views, matrix, mean_coef).int()).abs().max() <= 1


@pytest.mark.parametrize("shape", [(7, 24, 24), (3, 16, 20), (1, 8, 8)])
def test_packed_colour_map_equals_the_planar_map(shape):
    """RGBA pixels read as int32 words give the planar map of their RGB, whatever the fourth byte holds."""
    rgba = torch.randint(0, 256, (*shape, 4), dtype=torch.uint8, generator=gen(shape[0]))
    planar = rgba[..., :3].permute(0, 3, 1, 2).contiguous()
    matrix, mean_coef = _maps(shape[0], shape[1])
    words = rgba.view(torch.int32).squeeze(-1)
    eager = colour_map_rgbx_uint8(words, matrix, mean_coef)
    assert eager.shape == planar.shape and eager.dtype == torch.uint8
    assert torch.equal(eager, colour_map_uint8(planar, matrix, mean_coef))
    compiled = compiled_colour_map_rgbx_uint8(words, matrix, mean_coef)
    assert compiled_colour_map_rgbx_uint8.failure is None, compiled_colour_map_rgbx_uint8.failure
    assert (compiled.int() - eager.int()).abs().max() <= 1


@pytest.mark.parametrize("shape", [(5, 3, 24, 24), (2, 3, 12, 20), (1, 3, 32, 32), (4, 3, 5, 5)])
def test_compiled_blur_equals_the_convolution_blur(shape):
    views = torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen(1))
    sigma = 0.1 + 1.9 * torch.rand(shape[0], generator=gen(2))
    out = compiled_blur_uint8(views, sigma, 2.0)
    assert out.dtype == torch.uint8 and out.shape == views.shape
    assert (out.int() - gaussian_blur(views, sigma).int()).abs().max() <= 1
    assert not torch.equal(out, views)


def test_compile_failure_falls_back_once_with_a_warning():
    def not_traceable(x: torch.Tensor) -> torch.Tensor:
        if x.sum().item() > 0:  # data-dependent control flow: no full graph
            return x + 1
        return x - 1

    fn = CompiledFunction("test kernel", not_traceable, lambda x: x * 10)
    x = torch.ones(3)
    with pytest.warns(RuntimeWarning, match="torch.compile of the test kernel failed"):
        first = fn(x)
    assert torch.equal(first, x * 10) and fn.failure is not None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(fn(x), x * 10)  # no second warning, no second compile attempt


def test_clip_multicrop_warm_up_compiles_only_for_the_compiled_backend(monkeypatch):
    from dora_lightning.data.augment.multicrop import ClipMultiCrop

    calls = []
    fused = ClipMultiCrop(32, 16, num_local_crops=2, colour_backend="fused")
    monkeypatch.setattr(
        ClipMultiCrop, "__call__", lambda self, frames, gen: calls.append(tuple(frames.shape))
    )
    fused.warm_up(3, 40, 56)
    assert calls == []
    threads = torch.get_num_threads()
    monkeypatch.setattr(
        ClipMultiCrop,
        "__call__",
        lambda self, frames, gen: calls.append((tuple(frames.shape), torch.get_num_threads())),
    )
    ClipMultiCrop(32, 16, num_local_crops=2).warm_up(3, 40, 56, clips=2)
    assert calls == [((3, 40, 56, 4), 1)] * 2  # RGBA frames, one thread: as a data-loader worker runs it
    assert torch.get_num_threads() == threads


def test_packed_views_are_refused_by_the_eager_backends():
    from dora_lightning.data.augment.colour_views import NUM_DRAWS, colour_views
    from dora_lightning.data.augment.multicrop import ClipMultiCrop

    views = torch.zeros(2, 8, 8, 4, dtype=torch.uint8)
    u = torch.rand(2, NUM_DRAWS, generator=gen())
    for backend in ("fused", "exact"):
        settings = ClipMultiCrop(32, 16, colour_backend=backend).colour
        with pytest.raises(ValueError, match="packed"):
            colour_views(views, 255.0, u, [0, 1, 2, 3], 0.5, settings, packed=True)
    out = colour_views(views, 255.0, u, [0, 1, 2, 3], 0.5, ClipMultiCrop(32, 16).colour, packed=True)
    assert out.shape == (2, 3, 8, 8) and out.dtype == torch.uint8


# ----------------------------------------------------------------- workers of a GPU run (issue 15 item 1)
_BAD_FORK = (
    "Cannot re-initialize CUDA in forked subprocess. To use CUDA with multiprocessing, you must use the 'spawn' "
    "start method"
)


def _poison_cuda_as_a_fork_after_cuda_init(monkeypatch) -> list[str]:
    """Make this process (and children forked from it) look like a data-loader worker forked from a GPU run's
    training process: CUDA reports itself available, the process is in a 'bad fork', and initialising CUDA -- which
    every torch.cuda call that needs the device does first -- raises torch's own error. Returns the list that
    records each attempt (its caller), per process."""
    import traceback

    import torch.cuda.memory
    import torch.cuda.random

    attempts: list[str] = []

    def poisoned_lazy_init() -> None:
        attempts.append(traceback.format_stack(limit=3)[0].strip())
        raise RuntimeError(_BAD_FORK)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "_is_in_bad_fork", lambda: True)
    for module in (torch.cuda, torch.cuda.random, torch.cuda.memory):
        monkeypatch.setattr(module, "_lazy_init", poisoned_lazy_init)
    return attempts


def _fresh_kernel(x: torch.Tensor) -> torch.Tensor:
    return (x.float() * 1.25 + 7.0).clamp(0, 255).to(torch.uint8)


class _WorkerJob(torch.utils.data.Dataset):
    """One item: what a data-loader worker does with the compiled backend, and what it saw."""

    def __init__(self, attempts: list[str]) -> None:
        self.attempts = attempts

    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int) -> dict:
        from dora_lightning.data.augment.multicrop import ClipMultiCrop

        kernel = CompiledFunction(
            "fresh kernel", _fresh_kernel, _fresh_kernel
        )  # compiled here, in the worker
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            kernel(torch.arange(50, dtype=torch.uint8))
            frames = torch.randint(0, 256, (2, 44, 60, 4), dtype=torch.uint8, generator=gen(3))
            ClipMultiCrop(32, 16, num_local_crops=2)(frames, gen(4))  # a clip size the parent never compiled
        return {
            "failures": [
                f.failure
                for f in (kernel, compiled_colour_map_uint8, compiled_colour_map_rgbx_uint8)
                if f.failure
            ],
            "warnings": [str(w.message) for w in caught],
            "cuda_attempts": list(self.attempts),
        }


def test_workers_forked_after_cuda_init_compile_without_touching_cuda(monkeypatch):
    """The GPU-run sequence on the CPU: the parent warms the kernels up (datamodule.train_dataloader), initialises
    CUDA, forks a worker; the worker compiles kernels for new shapes. It used to fail in dynamo's CUDA RNG save
    ('Cannot re-initialize CUDA in forked subprocess') and fall back to eager with a compiler warning."""
    from dora_lightning.data.augment.multicrop import ClipMultiCrop

    ClipMultiCrop(32, 16, num_local_crops=2).warm_up(2, 40, 56, clips=1)
    attempts = _poison_cuda_as_a_fork_after_cuda_init(monkeypatch)
    loader = torch.utils.data.DataLoader(
        _WorkerJob(attempts), num_workers=1, collate_fn=lambda items: items[0], multiprocessing_context="fork"
    )
    (seen,) = list(loader)
    assert seen["failures"] == [] and seen["warnings"] == []
    assert seen["cuda_attempts"] == []  # nothing in the worker asked CUDA for anything


def test_cuda_is_hidden_only_where_it_must_not_be_touched(monkeypatch):
    from dora_lightning.data.augment.compiled import cpu_only_compilation, must_not_touch_cuda

    available = torch.cuda.is_available
    assert not must_not_touch_cuda()  # the main process of a run
    with cpu_only_compilation():
        assert torch.cuda.is_available is available
    monkeypatch.setattr(torch.cuda, "_is_in_bad_fork", lambda: True)
    assert must_not_touch_cuda()
    with cpu_only_compilation():
        assert torch.cuda.is_available() is False
        with cpu_only_compilation():  # nested: still hidden, restored once
            assert torch.cuda.is_available() is False
    assert torch.cuda.is_available is available


def test_the_warning_names_each_cause(monkeypatch):
    from dora_lightning.data.augment.compiled import failure_advice

    # no C++ compiler: inductor's own error, from a real compilation
    # (inductor's own config.patch: a monkeypatch of its config module leaves `cpp.cxx` deleted afterwards, which
    # breaks every later compilation in the process)
    kernel = CompiledFunction("no-compiler kernel", lambda x: (x * 3 + 11) // 2, lambda x: x)
    with (
        torch._inductor.config.patch({"cpp.cxx": ("/nonexistent/g++",)}),
        pytest.warns(RuntimeWarning, match=r"No working C\+\+ compiler was found: install one") as caught,
    ):
        kernel(torch.arange(7))
    assert "InvalidCxxCompiler" in kernel.failure and "colour_backend: fused" in str(caught[0].message)
    # CUDA in a forked worker, as dynamo wraps it
    try:
        try:
            raise RuntimeError(_BAD_FORK)
        except RuntimeError as inner:
            raise torch._dynamo.exc.InternalTorchDynamoError(f"RuntimeError: {inner}") from inner
    except Exception as err:
        advice = failure_advice(err)
    assert "forked after the training process initialised CUDA" in advice and "C++" not in advice
    # anything else: not blamed on the compiler
    advice = failure_advice(ValueError("something else"))
    assert "not a missing compiler" in advice and "install" not in advice
