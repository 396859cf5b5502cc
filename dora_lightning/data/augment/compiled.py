"""The augmentation's hot loops as ``torch.compile`` kernels, each with an eager fallback.

Run eagerly on a CPU, the fused colour map (:func:`~dora_lightning.data.augment.colour_ops.colour_map_uint8`, ~15
elementwise ops) makes one pass over memory per op, and the blur's grouped convolutions spend more time in padding,
layout copies and dtype conversions than in arithmetic. Inductor turns the colour map into one vectorised loop
(uint8 in, uint8 out) and each blur direction (:mod:`.blur`) into another: about 3-5x less time per clip.

Compiling costs seconds once per process (a data-loader worker compiles on its first clip; later processes reuse
inductor's on-disk cache). Where compilation is unavailable (no C++ compiler, an unsupported platform), the first
failure is reported with one warning and the eager implementation of the same math runs from then on: equal up to
float rounding (at most 1 in 255), slower; the warning names the cause.

The kernels run in data-loader workers, which never touch CUDA: in a GPU run they are forked after the training
process initialised CUDA, where any CUDA call fails ("Cannot re-initialize CUDA in forked subprocess"), and
torch.compile would otherwise make some (:func:`cpu_only_compilation`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import get_worker_info

from dora_lightning.data.augment.blur import (
    blur_columns,
    blur_radius,
    blur_rows,
    gaussian_blur,
    gaussian_kernels,
)
from dora_lightning.data.augment.colour_ops import colour_map_rgbx_uint8, colour_map_uint8

__all__ = [
    "CompiledFunction",
    "compiled_blur_uint8",
    "compiled_colour_map_rgbx_uint8",
    "compiled_colour_map_uint8",
    "cpu_only_compilation",
    "failure_advice",
    "must_not_touch_cuda",
]


# These kernels run in forked data-loader workers. Compile in-process (a compile-worker pool inherited from the
# parent process is not usable after a fork: waiting on it deadlocks) and emit single-threaded code (an OpenMP
# region entered in a forked child of a process that used OpenMP can hang; the workers run one thread each anyway).
_FORK_SAFE_INDUCTOR = {"compile_threads": 1, "cpp.threads": 1}

_BAD_FORK = "Cannot re-initialize CUDA in forked subprocess"


def _no_cuda() -> bool:
    return False


def must_not_touch_cuda() -> bool:
    """True in a data-loader worker and in any child forked after its parent initialised CUDA.

    There, compiling a CPU kernel must not ask CUDA anything: dynamo saves and restores the CUDA RNG state around
    every compilation and inductor asks the current device whether triton could run on it, each of which initialises
    CUDA when ``torch.cuda.is_available()`` -- an error in a child forked after CUDA was initialised (every worker of
    a GPU run), a CUDA context per worker otherwise.
    """
    return torch.cuda._is_in_bad_fork() or get_worker_info() is not None


@contextmanager
def cpu_only_compilation() -> Iterator[None]:
    """Within the block, ``torch.cuda.is_available()`` is False where :func:`must_not_touch_cuda` (no-op elsewhere).

    That is the one question torch.compile's CPU path asks before it touches CUDA, so a CPU kernel compiles and runs
    without initialising CUDA. A patch of this process only: workers never use CUDA, and the main process, whose
    CUDA is never hidden, keeps its answers (cached ones such as triton's availability included).
    """
    if not must_not_touch_cuda() or torch.cuda.is_available is _no_cuda:
        yield
        return
    available = torch.cuda.is_available
    torch.cuda.is_available = _no_cuda
    try:
        yield
    finally:
        torch.cuda.is_available = available


def _causes(err: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def failure_advice(err: BaseException) -> str:
    """What to do about a failed compilation, by its cause: no C++ compiler, CUDA in a forked worker, or other."""
    chain = list(_causes(err))
    text = " ".join(f"{type(e).__name__}: {e}" for e in chain)
    if any(type(e).__name__ == "InvalidCxxCompiler" for e in chain) or "No working C++ compiler" in text:
        return "No working C++ compiler was found: install one (e.g. apt install g++) to enable the compiled kernels"
    if _BAD_FORK in text:
        return (
            "The compilation asked CUDA for something in a data-loader worker forked after the training process "
            "initialised CUDA (this torch version's torch.compile touches CUDA in a way this project does not yet "
            "hide): please report it with your torch version"
        )
    if any(type(e).__name__ == "CppCompileError" for e in chain):
        return "The C++ compiler failed on the generated kernel (its message is above; check the compiler install)"
    return "This is not a missing compiler: please report it with your torch version"


class CompiledFunction:
    """``fn`` compiled with ``torch.compile`` on its first call; after a compile failure (one warning), ``fallback``.

    Compiles for the inputs' device (the CPU in data-loader workers, where CUDA is never touched: see
    :func:`cpu_only_compilation`). State is per process (a forked data-loader worker starts from its parent's).
    ``failure`` says what went wrong.
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
                with cpu_only_compilation():
                    return self._compiled(*args)
            except Exception as err:  # any compiler/toolchain failure: fall back, once, loudly
                first_line = (str(err).strip().splitlines() or [""])[0][:200]
                self.failure = f"{type(err).__name__}: {first_line}"
                warnings.warn(
                    f"colour_backend 'compiled': torch.compile of the {self.name} failed ({self.failure}); running "
                    f"the same math eagerly (slower). {failure_advice(err)}; or set colour_backend: fused to "
                    "silence this warning.",
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

    The same blur as :func:`~dora_lightning.data.augment.blur.gaussian_blur` (reflect padding, radius ``ceil(3
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
