"""A training step never waits for the device: on the meta device (tensors without values) anything that reads a
value back (``.item()``, ``bool(t)``, a boolean index, ``nonzero``) fails, and a copy watch sees every copy from
the host, which must not block (a blocking copy waits for all the work queued on a GPU)."""

from __future__ import annotations

import contextlib

import pytest
import torch
from conftest import MICRO_MODULE
from copy_watch import CopyWatch

from dora_lightning.data.augment.colour_views import normalize_views
from dora_lightning.imagenet import IMAGENET_MEAN, IMAGENET_STD
from dora_lightning.module import DoRAModule


@pytest.fixture
def meta_autocast(monkeypatch):
    """torch.autocast refuses the meta device; there it is a no-op (the precision code paths are tested elsewhere)."""
    real = torch.autocast

    def autocast(device_type, *args, **kwargs):
        return contextlib.nullcontext() if device_type == "meta" else real(device_type, *args, **kwargs)

    monkeypatch.setattr(torch, "autocast", autocast)


@pytest.mark.parametrize("method", ["dora", "dino"])
def test_the_loss_the_tracker_and_the_backward_never_wait_for_the_device(method, meta_autocast):
    """Before 2026-12-06 the DINO loss picked the off-diagonal pairs with a boolean index (a wait each step) and
    the tracker copied its head indices to the device with a blocking copy (a wait each DoRA step)."""
    module = DoRAModule(**MICRO_MODULE, method=method, lean_mlp=False).to("meta")
    globals_ = 1 if method == "dora" else 2
    batch = {
        "global_views": [torch.empty(2, 2, 3, 32, 32, device="meta") for _ in range(globals_)],
        "local_views": [torch.empty(2, 2, 3, 16, 16, device="meta") for _ in range(2)],
    }
    with CopyWatch() as watch:
        parts, _, tracked = module.compute_loss(batch, teacher_temp=0.04)
        parts.total.backward()
    assert parts.total.device.type == "meta"
    assert (tracked is not None) == (method == "dora")
    assert all(non_blocking for _, _, non_blocking in watch.copies), watch.copies


def test_normalising_uint8_views_on_the_device_never_waits():
    """The views made in the loader workers are normalised after the transfer (two constants per view tensor)."""
    views = torch.empty(2, 2, 3, 8, 8, dtype=torch.uint8, device="meta")
    with CopyWatch() as watch:
        out = normalize_views(views, IMAGENET_MEAN, IMAGENET_STD)
    assert out.dtype == torch.float32 and out.device.type == "meta"
    assert watch.copies and all(
        (src, dst, non_blocking) == ("cpu", "meta", True) for src, dst, non_blocking in watch.copies
    )
