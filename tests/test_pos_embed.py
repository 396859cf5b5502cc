"""The backbone's position embedding at other image sizes is DINO's (bicubic, scale factors (g + 0.1) / s, no
antialiasing; timm's antialiased resampling smoothed the student's local crops), and its class token is initialised
as DINO's; the weights stay plain timm weights."""

from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed

from dora_lightning.models.backbone import build_vit
from dora_lightning.models.pos_embed import interpolate_pos_embed


def dino_interpolate_pos_encoding(pos_embed: torch.Tensor, w0: int, h0: int) -> torch.Tensor:
    """DINO's vision_transformer.py ``interpolate_pos_encoding`` written out, for images whose ``B, nc, w, h =
    x.shape`` gives w0 = w // patch, h0 = h // patch (so w0 counts rows)."""
    n = pos_embed.shape[1] - 1
    side, dim = int(math.sqrt(n)), pos_embed.shape[-1]
    patches = pos_embed[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2)
    w0, h0 = w0 + 0.1, h0 + 0.1
    patches = F.interpolate(patches, scale_factor=(w0 / side, h0 / side), mode="bicubic")
    return torch.cat([pos_embed[:, :1], patches.permute(0, 2, 3, 1).reshape(1, -1, dim)], dim=1)


@pytest.mark.parametrize("grid", [(7, 7), (4, 4), (20, 20), (30, 53)])
def test_grids_are_resampled_exactly_as_dino(grid):
    """Local crops (7 x 7), the demo's (4 x 4), larger and DAVIS's 480p (30 x 53) grids."""
    torch.manual_seed(0)
    pos_embed = torch.randn(1, 1 + 14 * 14, 32) * 0.02
    ours = interpolate_pos_embed(pos_embed, grid, (14, 14), 1)
    torch.testing.assert_close(ours, dino_interpolate_pos_encoding(pos_embed, *grid), rtol=0, atol=0)
    assert interpolate_pos_embed(pos_embed, (14, 14), (14, 14), 1) is pos_embed


def test_a_non_square_grid_resamples_each_axis_by_its_own_factor():
    """A 3 x 6 grid from an embedding that holds its row number: rows stay ordered down, constant across."""
    rows = torch.arange(14.0).view(14, 1).expand(14, 14).reshape(1, 196, 1)
    pos_embed = torch.cat([torch.zeros(1, 1, 1), rows], dim=1)
    out = interpolate_pos_embed(pos_embed, (3, 6), (14, 14), 1)[0, 1:, 0].view(3, 6)
    torch.testing.assert_close(out, out[:, :1].expand(3, 6))
    assert out[0, 0] < out[1, 0] < out[2, 0]


def test_the_backbone_uses_it_for_local_crops_and_not_timms_resampling():
    torch.manual_seed(0)
    model = build_vit("vit_small_patch16_224", depth=1)
    images = torch.randn(2, 3, 112, 112)
    patches = model.patch_embed(images)  # (B, 7, 7, C): dynamic image size
    ours = model._pos_embed(patches)
    expected = torch.cat([model.cls_token.expand(2, -1, -1), patches.flatten(1, 2)], dim=1)
    dino = dino_interpolate_pos_encoding(model.pos_embed, 7, 7)
    torch.testing.assert_close(ours, expected + dino)
    timms = resample_abs_pos_embed(model.pos_embed, new_size=(7, 7), old_size=(14, 14), num_prefix_tokens=1)
    assert (timms - dino).norm() / dino.norm() > 0.5  # what the student's local crops got before
    assert model.forward_features(images).shape == (2, 50, 384)
    assert model.forward_features(torch.randn(1, 3, 224, 224)).shape == (1, 197, 384)


def test_class_token_is_initialised_as_dinos_and_the_weights_stay_timms():
    torch.manual_seed(0)
    model = build_vit("vit_small_patch16_224", depth=2)
    assert 0.015 < model.cls_token.std().item() < 0.025  # trunc-normal 0.02 (timm's: 1e-6)
    plain = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, depth=2)
    plain.load_state_dict(model.state_dict(), strict=True)  # an exported backbone loads in plain timm
    assert list(plain.state_dict()) == list(model.state_dict())
