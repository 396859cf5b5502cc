"""The student's AdamW: fused on CUDA only where no gradient scaler is at work (dora_lightning/optimizer.py)."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from conftest import MICRO_MODULE

import dora_lightning.module as module_file
from dora_lightning.module import DoRAModule
from dora_lightning.optimizer import student_adamw, use_fused_adamw

ON_CUDA = [SimpleNamespace(is_cuda=True)] * 3


def test_fused_only_on_cuda_and_never_under_a_gradient_scaler():
    """Under 16-mixed Lightning does not unscale a fused AdamW's gradients before the clip: clipping them to norm 3
    would clip gradients scaled by 65,536."""
    assert use_fused_adamw(ON_CUDA, grad_scaler=False)
    assert not use_fused_adamw(ON_CUDA, grad_scaler=True)
    assert not use_fused_adamw([*ON_CUDA, SimpleNamespace(is_cuda=False)], grad_scaler=False)
    assert not use_fused_adamw([], grad_scaler=False)


def test_a_cpu_student_gets_the_default_adamw_with_dinos_groups():
    module = DoRAModule(**MICRO_MODULE)
    optimizer = student_adamw(module.student, grad_scaler=False)
    assert not optimizer.defaults.get("fused")
    decay, no_decay = (group["params"] for group in optimizer.param_groups)
    assert no_decay and all(p.ndim <= 1 for p in no_decay) and all(p.ndim >= 2 for p in decay)
    assert optimizer.param_groups[1]["weight_decay"] == 0.0
    trainable = [p for p in module.student.parameters() if p.requires_grad]
    assert len(decay) + len(no_decay) == len(trainable)


def test_the_module_tells_the_optimiser_whether_its_precision_scales_the_loss(monkeypatch):
    seen = []
    monkeypatch.setattr(module_file, "student_adamw", lambda student, grad_scaler: seen.append(grad_scaler))
    module = DoRAModule(**MICRO_MODULE)
    module.configure_optimizers()  # no Trainer: benchmarks build the optimiser this way
    for scaler in (None, torch.amp.GradScaler("cpu")):
        module._trainer = SimpleNamespace(precision_plugin=SimpleNamespace(scaler=scaler))
        module.configure_optimizers()
    module._trainer = None
    assert seen == [False, False, True]
