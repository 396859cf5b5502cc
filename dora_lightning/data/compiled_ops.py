"""The augmentation's hot loops as ``torch.compile`` kernels, each with an eager fallback.

Run eagerly on a CPU, the fused colour map (:func:`~dora_lightning.data.color_ops.colour_map_uint8`, ~15
elementwise ops) makes one pass over memory per op, and the blur's grouped convolutions spend more time in padding,
layout copies and dtype conversions than in arithmetic. Inductor turns the colour map into one vectorised loop
(uint8 in, uint8 out) and each blur direction (:mod:`.blur_ops`) into another: about 3-5x less time per clip.

Compiling costs seconds once per process (a data-loader worker compiles on its first clip; later processes reuse
inductor's on-disk cache). Where compilation is unavailable (no C++ compiler, an unsupported platform), the first
failure is reported with one warning and the eager implementation of the same math runs from then on: equal up to
float rounding (at most 1 in 255), slower.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from dora_lightning.data.blur_ops import blur_columns, blur_radius, blur_rows, gaussian_blur, gaussian_kernels
from dora_lightning.data.color_ops import colour_map_rgbx_uint8, colour_map_uint8

__all__ = [
    "CompiledFunction",
    "compiled_blur_uint8",
    "compiled_colour_map_rgbx_uint8",
    "compiled_colour_map_uint8",
]


# These kernels run in forked data-loader workers. Compile in-process (a compile-worker pool inherited from the
# parent process is not usable after a fork: waiting on it deadlocks) and emit single-threaded code (an OpenMP
# region entered in a forked child of a process that used OpenMP can hang; the workers run one thread each anyway).
_FORK_SAFE_INDUCTOR = {"compile_threads": 1, "cpp.threads": 1}


class CompiledFunction:
    """``fn`` compiled with ``torch.compile`` on its first call; after a compile failure (one warning), ``fallback``.

    State is per process (a forked data-loader worker starts from its parent's). ``failure`` says what went wrong.
    """

    def __init__(self, name: str, fn: Callable, fallback: Callable, dynamic: bool | None = None) -> None:
        self.name = name
        self.fn = fn
        self.fallback = fallback
        self.dynamic = dynamic
        self.failure: str | None = None
        self._compiled: Callable | None = None

    def __call__(self, *args: Tensor) -> Tensor:
        if self.failure is None:
            try:
                if self._compiled is None:
                    self._compiled = torch.compile(
                        self.fn, dynamic=self.dynamic, fullgraph=True, options=_FORK_SAFE_INDUCTOR
                    )
                return self._compiled(*args)
            except Exception as err:  # any compiler/toolchain failure: fall back, once, loudly
                first_line = (str(err).strip().splitlines() or [""])[0][:200]
                self.failure = f"{type(err).__name__}: {first_line}"
                warnings.warn(
                    f"colour_backend 'compiled': torch.compile of the {self.name} failed ({self.failure}); running "
                    "the same math eagerly (slower). Install a C++ compiler (e.g. apt install g++) to enable it, or "
                    "set colour_backend: fused to silence this warning.",
                    RuntimeWarning,
                    stacklevel=2,
                )
        return self.fallback(*args)


compiled_colour_map_uint8 = CompiledFunction("colour map", colour_map_uint8, colour_map_uint8)
compiled_colour_map_rgbx_uint8 = CompiledFunction(
    "colour map (packed pixels)", colour_map_rgbx_uint8, colour_map_rgbx_uint8
)
_rows = CompiledFunction("blur (rows)", blur_rows, blur_rows, dynamic=True)
_columns = CompiledFunction("blur (columns)", blur_columns, blur_columns, dynamic=True)


def compiled_blur_uint8(views: Tensor, sigma: Tensor, sigma_max: float) -> Tensor:
    """Gaussian-blur uint8 views (n, C, H, W) with per-view ``sigma`` (n,) <= ``sigma_max``; uint8, rounded.

    The same blur as :func:`~dora_lightning.data.blur_ops.gaussian_blur` (reflect padding, radius ``ceil(3
    sigma)``), with kernels zero-padded to the largest radius ``sigma_max`` allows, so every call has the same
    kernel length and the compiled passes are reused. Runs the convolution version if either pass failed to
    compile.
    """
    radius = blur_radius(sigma_max, views.shape[2], views.shape[3])
    if views.shape[0] == 0 or radius == 0:
        return views.clone()
    if _rows.failure is None and _columns.failure is None:
        kernel = gaussian_kernels(sigma, radius, width=radius).to(device=views.device, dtype=torch.float32)
        rows = _rows(F.pad(views, (radius, radius, radius, radius), mode="reflect"), kernel)
        out = _columns(rows, kernel) if _rows.failure is None else None
        if out is not None and _columns.failure is None:
            return out
    return gaussian_blur(views, sigma)
