"""LeanMlp gives timm's Mlp results and gradients while saving less for the backward pass."""

from __future__ import annotations

import copy

import pytest
import torch

from dora_lightning.models.backbone import build_vit
from dora_lightning.models.lean_mlp import LeanMlp, use_lean_mlps_


def micro_vit():
    torch.manual_seed(0)
    return build_vit("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=3)


def test_same_outputs_gradients_and_keys():
    plain = micro_vit()
    lean = copy.deepcopy(plain)
    assert use_lean_mlps_(lean) == 2 and isinstance(lean.blocks[0].mlp, LeanMlp)
    assert list(lean.state_dict()) == list(plain.state_dict())
    x = torch.randn(3, 3, 32, 32)
    plain(x).square().sum().backward()
    lean(x).square().sum().backward()
    torch.testing.assert_close(lean(x), plain(x))
    for (name, p), q in zip(plain.named_parameters(), lean.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_autocast_matches_plain(dtype):
    plain = micro_vit()
    lean = copy.deepcopy(plain)
    use_lean_mlps_(lean)
    x = torch.randn(2, 3, 32, 32)
    with torch.autocast("cpu", dtype=dtype):
        out_plain, out_lean = plain(x), lean(x)
    assert out_lean.dtype == out_plain.dtype
    torch.testing.assert_close(out_lean.float(), out_plain.float(), rtol=2e-2, atol=2e-2)


def test_saves_less_for_backward():
    def saved_bytes(model):
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(torch.randn(8, 3, 32, 32)).sum()
        return total

    plain = micro_vit()
    lean = copy.deepcopy(plain)
    use_lean_mlps_(lean)
    assert saved_bytes(lean) < 0.85 * saved_bytes(plain)
