"""The position embedding at other image sizes, resampled as DINO's ViT (and the official DoRA code) does it: the
student's 112 px local crops (a 7 x 7 grid from the stored 14 x 14) and the evaluators' other sizes."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor

__all__ = ["DinoPositionViT", "interpolate_pos_embed"]


def interpolate_pos_embed(
    pos_embed: Tensor, grid: tuple[int, int], stored: tuple[int, int], num_prefix: int
) -> Tensor:
    """The (1, prefix + gh * gw, C) position embedding of a (gh, gw) patch grid from ``pos_embed``, stored for the
    (sh, sw) grid: DINO's ``interpolate_pos_encoding``, bicubic with scale factors (g + 0.1) / s and no antialiasing
    (timm's resampling antialiases, which smooths a downsized embedding: at 14 -> 7 a fresh ViT-S's std 0.0083
    against DINO's 0.0145); unchanged at the stored grid. The rows' factor goes with the rows, the columns' with the
    columns (DINO's names them w and h, but takes w from the rows, so its grids are not transposed either)."""
    if tuple(grid) == tuple(stored):
        return pos_embed
    prefix, patches = pos_embed[:, :num_prefix], pos_embed[:, num_prefix:]
    dim = pos_embed.shape[-1]
    patches = patches.reshape(1, stored[0], stored[1], dim).permute(0, 3, 1, 2).float()
    factors = ((grid[0] + 0.1) / stored[0], (grid[1] + 0.1) / stored[1])
    patches = F.interpolate(patches, scale_factor=factors, mode="bicubic", align_corners=False)
    if tuple(patches.shape[-2:]) != tuple(grid):
        raise RuntimeError(
            f"position embedding resampled to {tuple(patches.shape[-2:])}, expected {tuple(grid)}"
        )
    patches = patches.permute(0, 2, 3, 1).reshape(1, -1, dim).to(pos_embed.dtype)
    return torch.cat([prefix, patches], dim=1)


class DinoPositionViT(VisionTransformer):
    """timm's VisionTransformer (built with ``dynamic_img_size``) whose position embedding reaches other image sizes
    by :func:`interpolate_pos_embed`, as in DINO and the official DoRA code; the same weights and state dict."""

    def _pos_embed(self, x: Tensor) -> Tensor:
        if not self.dynamic_img_size or self.pos_embed is None:
            return super()._pos_embed(x)
        batch, height, width, dim = x.shape
        pos_embed = interpolate_pos_embed(
            self.pos_embed,
            (height, width),
            tuple(self.patch_embed.grid_size),
            0 if self.no_embed_class else self.num_prefix_tokens,
        )
        tokens = x.view(batch, -1, dim)
        prefix = [
            token.expand(batch, -1, -1) for token in (self.cls_token, self.reg_token) if token is not None
        ]
        if self.no_embed_class:
            tokens = torch.cat([*prefix, tokens + pos_embed], dim=1)
        else:
            tokens = torch.cat([*prefix, tokens], dim=1) + pos_embed
        return self.pos_drop(tokens)
