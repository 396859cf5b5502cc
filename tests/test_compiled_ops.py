"""Tests for dora_lightning.data.compiled_ops: the compiled kernels equal the eager math; a compile failure falls back
with one warning."""

from __future__ import annotations

import warnings

import pytest
import torch

from dora_lightning.data.blur_ops import gaussian_blur
from dora_lightning.data.color_ops import colour_map_rgbx_uint8, colour_map_uint8, colour_matrix
from dora_lightning.data.compiled_ops import (
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
    from dora_lightning.data.transforms import ClipMultiCrop

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
    from dora_lightning.data.transforms import ClipMultiCrop
    from dora_lightning.data.view_colour import NUM_DRAWS, colour_views

    views = torch.zeros(2, 8, 8, 4, dtype=torch.uint8)
    u = torch.rand(2, NUM_DRAWS, generator=gen())
    for backend in ("fused", "exact"):
        settings = ClipMultiCrop(32, 16, colour_backend=backend).colour
        with pytest.raises(ValueError, match="packed"):
            colour_views(views, 255.0, u, [0, 1, 2, 3], 0.5, settings, packed=True)
    out = colour_views(views, 255.0, u, [0, 1, 2, 3], 0.5, ClipMultiCrop(32, 16).colour, packed=True)
    assert out.shape == (2, 3, 8, 8) and out.dtype == torch.uint8
