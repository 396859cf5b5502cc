"""DINOHead and the timm ViT backbone helpers (micro ViTs only, CPU)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dora_lightning.models import (
    DINOHead,
    build_vit,
    cancel_last_layer_grad_,
    forward_features,
    forward_with_last_block_taps,
    last_n_block_cls,
)

MICRO = dict(embed_dim=48, depth=2, num_heads=3, patch_size=16)


# ----------------------------------------------------------------------------------------------- head
def _head(norm_last_layer: bool = True, **kw) -> DINOHead:
    cfg = dict(out_dim=64, hidden_dim=32, bottleneck_dim=16)
    cfg.update(kw)
    return DINOHead(48, norm_last_layer=norm_last_layer, **cfg)


def test_head_output_shape_and_layout():
    torch.manual_seed(0)
    head = _head()
    assert head(torch.randn(5, 48)).shape == (5, 64)
    assert head(torch.randn(2, 3, 48)).shape == (2, 3, 64)
    linears = [m for m in head.mlp if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(48, 32), (32, 32), (32, 16)]
    assert all(torch.count_nonzero(m.bias) == 0 for m in linears)
    assert all(abs(m.weight.std().item() - 0.02) < 0.01 for m in linears)
    assert isinstance(_head(num_layers=1).mlp, nn.Linear)
    assert sum(isinstance(m, nn.BatchNorm1d) for m in _head(use_bn=True).mlp) == 2
    keys = set(head.state_dict())
    assert {"mlp.0.weight", "mlp.2.weight", "mlp.4.weight"} <= keys
    assert {
        "last_layer.parametrizations.weight.original0",
        "last_layer.parametrizations.weight.original1",
    } <= keys


def test_head_bottleneck_is_l2_normalised_and_weight_normed():
    torch.manual_seed(0)
    head = _head()
    x = torch.randn(4, 48)
    z = F.normalize(head.mlp(x), dim=-1)
    w = head.last_layer.weight  # recomputed from g, v
    torch.testing.assert_close(head(x), z @ w.T)
    torch.testing.assert_close(w.norm(dim=1), torch.ones(64))  # g = 1 => unit rows
    assert not torch.allclose(head(x), head.mlp(x) @ w.T)  # the normalisation matters
    # scaling v leaves the output unchanged (weight-norm with fixed g)
    with torch.no_grad():
        head.weight_v.mul_(3.0)
    torch.testing.assert_close(head(x), z @ w.T, rtol=1e-5, atol=1e-6)


def test_head_last_layer_runs_in_fp32_under_bf16_autocast():
    """The MLP runs in bf16, but the wide last layer gets the fp32 bottleneck and returns fp32 logits (spec G.3)."""
    torch.manual_seed(0)
    head = _head(norm_last_layer=False, out_dim=4096)
    x = torch.randn(6, 48)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = head(x)
        bottleneck = head.mlp(x)
    assert bottleneck.dtype == torch.bfloat16, "the MLP no longer runs under autocast"
    assert logits.dtype == torch.float32
    expected = head.last_layer(F.normalize(bottleneck.float(), dim=-1))  # fp32, no autocast
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)
    rounded = expected.bfloat16().float()
    assert not torch.equal(logits, rounded), "logits carry no more than bf16 precision"
    logits.sum().backward()
    assert head.weight_v.grad.dtype == torch.float32 and head.mlp[0].weight.grad is not None


@pytest.mark.parametrize("norm_last_layer", [True, False])
def test_head_weight_g_frozen_iff_norm_last_layer(norm_last_layer):
    head = _head(norm_last_layer=norm_last_layer)
    g = head.weight_g
    assert g is head.last_layer.parametrizations.weight.original0
    assert g.shape == (64, 1)
    assert torch.all(g == 1.0)
    assert g.requires_grad is (not norm_last_layer)
    assert head.weight_v.requires_grad
    head(torch.randn(3, 48)).sum().backward()
    assert (g.grad is None) is norm_last_layer


def test_head_deepcopy_and_cancel_last_layer_grad():
    torch.manual_seed(0)
    head = _head(norm_last_layer=False)
    teacher = copy.deepcopy(head)
    torch.testing.assert_close(teacher(torch.ones(1, 48)), head(torch.ones(1, 48)))

    opt = torch.optim.AdamW(head.parameters(), lr=0.1, weight_decay=0.5)
    before = {n: p.detach().clone() for n, p in head.named_parameters()}
    head(torch.randn(6, 48)).pow(2).sum().backward()
    assert head.weight_v.grad is not None and head.weight_g.grad is not None
    cancel_last_layer_grad_(head)
    assert head.weight_v.grad is None and head.weight_g.grad is None
    assert head.mlp[0].weight.grad is not None
    opt.step()
    after = dict(head.named_parameters())
    for name, value in before.items():
        changed = not torch.equal(after[name], value)
        assert changed is (not name.startswith("last_layer")), name
    with pytest.raises(ValueError):
        cancel_last_layer_grad_(nn.Linear(2, 2))


# ----------------------------------------------------------------------------------------------- backbone
@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return build_vit("vit_tiny_patch16_224", img_size=64, **MICRO).eval()


@pytest.fixture(scope="module")
def vit_reg():
    torch.manual_seed(1)
    return build_vit("vit_tiny_patch16_224", img_size=64, reg_tokens=2, qk_norm=True, **MICRO).eval()


def _reference_last_block(model, images):
    """Explicit, unfused evaluation of the last block from its input (captured with a pre-hook)."""
    captured = {}
    blk = model.blocks[-1]
    h1 = blk.register_forward_pre_hook(lambda m, args: captured.__setitem__("x", args[0]))
    h2 = blk.register_forward_hook(lambda m, args, out: captured.__setitem__("out", out))
    try:
        feats = model.forward_features(images)
    finally:
        h1.remove()
        h2.remove()
    x, attn = captured["x"], blk.attn
    b, n_tok, d = x.shape
    y = blk.norm1(x)
    qkv = y @ attn.qkv.weight.T + attn.qkv.bias
    qkv = qkv.reshape(b, n_tok, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = attn.q_norm(qkv[0]), attn.k_norm(qkv[1]), qkv[2]
    a = torch.softmax((q @ k.transpose(-2, -1)) * attn.head_dim**-0.5, dim=-1)  # (B, h, L, L)
    # the block output rebuilt from this attention must equal the model's own (fused) block output
    o = attn.proj((a @ v).transpose(1, 2).reshape(b, n_tok, d))
    out = x + blk.ls1(o)
    out = out + blk.ls2(blk.mlp(blk.norm2(out)))
    torch.testing.assert_close(out, captured["out"], rtol=1e-5, atol=1e-5)
    p = model.num_prefix_tokens
    return feats, a[:, :, 0, p:], q[:, :, p:], k[:, :, p:]


@pytest.mark.parametrize("hw", [(64, 64), (96, 64)])
@pytest.mark.parametrize("which", ["vit", "vit_reg"])
def test_last_block_taps_equal_unfused_reference(request, which, hw):
    model = request.getfixturevalue(which)
    assert model.blocks[-1].attn.fused_attn  # the fast path stays on
    torch.manual_seed(2)
    images = torch.randn(2, 3, *hw)
    with torch.no_grad():
        out = forward_with_last_block_taps(model, images)
        feats, ref_attn, ref_q, ref_k = _reference_last_block(model, images)
    gh, gw = hw[0] // 16, hw[1] // 16
    n, h, dh = gh * gw, 3, 16
    assert out.grid == (gh, gw)
    assert out.cls.shape == (2, 48) and out.patch_tokens.shape == (2, n, 48)
    assert out.cls_attention.shape == (2, h, n)
    assert out.queries.shape == (2, h, n, dh) and out.keys.shape == (2, h, n, dh)
    assert out.cls_attention.dtype == out.queries.dtype == torch.float32
    torch.testing.assert_close(out.cls_attention, ref_attn, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.queries, ref_q, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.keys, ref_k, rtol=1e-5, atol=1e-6)
    p = model.num_prefix_tokens
    torch.testing.assert_close(out.cls, feats[:, 0])
    torch.testing.assert_close(out.patch_tokens, feats[:, p:])
    # prefix tokens take part in the softmax: patch columns sum to < 1 when register tokens exist
    sums = out.cls_attention.sum(-1)
    assert torch.all(sums <= 1 + 1e-6)
    if p > 1:
        assert torch.all(sums < 1 - 1e-6)
    cls, patches = forward_features(model, images)
    torch.testing.assert_close(cls, feats[:, 0])
    torch.testing.assert_close(patches, feats[:, p:])
    assert not model.blocks[-1].attn.qkv._forward_hooks  # hook removed


def test_taps_are_float32_under_bf16_autocast(vit):
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = forward_with_last_block_taps(vit, images)
    assert out.cls_attention.dtype == out.queries.dtype == out.keys.dtype == torch.float32
    with torch.no_grad():
        ref = forward_with_last_block_taps(vit, images)
    torch.testing.assert_close(out.cls_attention, ref.cls_attention, rtol=0.1, atol=2e-2)


def test_last_n_block_cls(vit):
    images = torch.randn(3, 3, 96, 64)
    outs = []
    hooks = [blk.register_forward_hook(lambda m, a, o: outs.append(o)) for blk in vit.blocks]
    try:
        with torch.no_grad():
            feat = last_n_block_cls(vit, images, 2)
    finally:
        for hk in hooks:
            hk.remove()
    assert feat.shape == (3, 96)
    torch.testing.assert_close(feat[:, :48], vit.norm(outs[0])[:, 0])
    torch.testing.assert_close(feat[:, 48:], vit.norm(outs[1])[:, 0])
    with torch.no_grad():
        torch.testing.assert_close(feat[:, 48:], forward_features(vit, images)[0])
        assert last_n_block_cls(vit, images, 1).shape == (3, 48)
    with pytest.raises(ValueError):
        last_n_block_cls(vit, images, 3)


def test_build_vit_options():
    model = build_vit("vit_tiny_patch16_224", img_size=32, drop_path_rate=0.1, **{**MICRO, "patch_size": 8})
    assert model.num_classes == 0 and model.num_features == 48
    assert model.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)
    assert model.patch_embed.grid_size == (4, 4)


def test_build_vit_rejects_non_vits():
    with pytest.raises(ValueError, match="resnet18"):
        build_vit("resnet18", img_size=64)
    with pytest.raises(ValueError, match="no_such_model"):
        build_vit("no_such_model")
    with pytest.raises(ValueError, match="class token"):
        build_vit("vit_tiny_patch16_224", img_size=64, class_token=False, global_pool="avg", **MICRO)
