"""timm ViT backbones and the teacher's last-block taps for the tracker (spec A.0, G.3, G.6).

The tracker needs, from the teacher's last block, the CLS->patch attention and the per-head patch queries/keys. timm's
blocks use fused scaled-dot-product attention, which never materialises the attention matrix; rather than disabling it
for the whole network, :func:`forward_with_last_block_taps` hooks ``blocks[-1].attn.qkv``, keeps its output and
recomputes only the CLS row of ``softmax(q k^T * scale)`` from it (in float32).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import timm
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from dora_lightning.core.tracker import TrackerInputs

__all__ = [
    "clip_tracker_inputs",
    "TeacherForward",
    "build_vit",
    "check_vit",
    "forward_features",
    "forward_with_last_block_taps",
    "last_block_tokens",
    "patch_size_of",
    "last_n_block_cls",
]


def check_vit(model: nn.Module, name: str = "model") -> VisionTransformer:
    """Raise ``ValueError`` unless ``model`` is a timm ViT usable here; return it typed.

    Requirements: a :class:`timm.models.vision_transformer.VisionTransformer` with a class token, a final norm on the
    token sequence (not ``fc_norm``), and a last block whose ``attn`` has a fused ``qkv`` linear projection
    (timm's standard ``Attention``, possibly with q/k norm).
    """
    if not isinstance(model, VisionTransformer):
        raise ValueError(
            f"{name!r} is not a timm VisionTransformer (got {type(model).__name__}); dora-lightning needs a vit_* model"
        )
    if not getattr(model, "has_class_token", False) or getattr(model, "cls_token", None) is None:
        raise ValueError(f"{name!r} has no class token (class_token=False); DoRA needs a CLS token")
    if isinstance(model.norm, nn.Identity):
        raise ValueError(
            f"{name!r} has no final norm on the token sequence (fc_norm/global_pool='avg' or final_norm=False); "
            "use global_pool='token'"
        )
    if len(model.blocks) == 0:
        raise ValueError(f"{name!r} has no transformer blocks")
    attn = getattr(model.blocks[-1], "attn", None)
    qkv = getattr(attn, "qkv", None)
    if not isinstance(qkv, nn.Linear) or not all(
        hasattr(attn, a) for a in ("num_heads", "head_dim", "scale")
    ):
        raise ValueError(
            f"{name!r}: the last block has no standard attention with a fused qkv projection "
            f"(blocks[-1].attn is {type(attn).__name__}); the tracker taps blocks[-1].attn.qkv"
        )
    if qkv.out_features != 3 * attn.num_heads * attn.head_dim:
        raise ValueError(
            f"{name!r}: blocks[-1].attn.qkv has {qkv.out_features} outputs, expected 3*heads*head_dim"
        )
    return model


def patch_size_of(model: VisionTransformer) -> int:
    """The ViT's patch size; ValueError when its patches are not square (the tracker, the probes and the crops
    assume square patches)."""
    size = model.patch_embed.patch_size
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    if height != width:
        raise ValueError(
            f"the backbone's patches are not square ({height}x{width}); use a ViT with square patches"
        )
    return int(height)


def build_vit(
    name: str = "vit_small_patch16_224",
    img_size: int = 224,
    drop_path_rate: float = 0.0,
    **timm_kwargs: Any,
) -> VisionTransformer:
    """Create a randomly initialised timm ViT without classifier, with dynamic image size.

    Calls ``timm.create_model(name, pretrained=False, num_classes=0, img_size=img_size, dynamic_img_size=True,
    drop_path_rate=drop_path_rate, **timm_kwargs)`` (``timm_kwargs`` may override those defaults, e.g. ``embed_dim``,
    ``depth``, ``num_heads``, ``patch_size``, ``reg_tokens``) and validates it with :func:`check_vit`.

    Raises:
        ValueError: ``name`` is unknown to timm, is not a ViT accepting these arguments, cannot take them (embed_dim
            not divisible by num_heads, patch_size 0), or fails :func:`check_vit`.
    """
    if not timm.is_model(name):
        raise ValueError(
            f"unknown timm model {name!r}; expected a timm ViT name such as 'vit_small_patch16_224'"
        )
    kwargs: dict[str, Any] = {
        "pretrained": False,
        "num_classes": 0,
        "img_size": img_size,
        "dynamic_img_size": True,
        "drop_path_rate": drop_path_rate,
    }
    kwargs.update(timm_kwargs)
    try:
        model = timm.create_model(name, **kwargs)
    except TypeError as err:
        raise ValueError(
            f"timm model {name!r} is not a VisionTransformer accepting img_size/dynamic_img_size ({err}); "
            "dora-lightning needs a vit_* model with a class token"
        ) from err
    except (AssertionError, ArithmeticError) as err:
        # timm's checks of impossible shapes (dim % heads, patch 0)
        shape = ", ".join(f"{key}={value}" for key, value in timm_kwargs.items())
        raise ValueError(
            f"timm cannot build {name!r} with img_size={img_size}{', ' + shape if shape else ''}: "
            f"{err or type(err).__name__}"
        ) from err
    return check_vit(model, name)


@dataclass
class TeacherForward:
    """Outputs of :func:`forward_with_last_block_taps` for B images with an (gh, gw) patch grid, N = gh * gw.

    Attributes:
        cls: (B, d) final-normed CLS token (model dtype).
        patch_tokens: (B, N, d) final-normed patch tokens Z, prefix tokens removed (model dtype).
        cls_attention: (B, h, N) last block's CLS->patch attention: the CLS row of softmax(q k^T * scale) over all
            tokens (prefix tokens included, as in the official code), restricted to the patch columns. float32, detached.
        queries: (B, h, N, dh) last block's per-head patch queries after ``q_norm``, unscaled. float32, detached.
        keys: (B, h, N, dh) last block's per-head patch keys after ``k_norm``. float32, detached.
        grid: (gh, gw) patch grid; patch n sits at row ``n // gw``, column ``n % gw``.
    """

    cls: Tensor
    patch_tokens: Tensor
    cls_attention: Tensor
    queries: Tensor
    keys: Tensor
    grid: tuple[int, int]


def _grid(model: VisionTransformer, images: Tensor) -> tuple[int, int]:
    gh, gw = model.patch_embed.dynamic_feat_size((images.shape[-2], images.shape[-1]))
    return int(gh), int(gw)


def _split_tokens(model: VisionTransformer, x: Tensor, grid: tuple[int, int]) -> tuple[Tensor, Tensor]:
    n_prefix = model.num_prefix_tokens
    patches = x[:, n_prefix:]
    if patches.shape[1] != grid[0] * grid[1]:
        raise RuntimeError(f"got {patches.shape[1]} patch tokens, expected grid {grid[0]}x{grid[1]}")
    return x[:, 0], patches


def forward_features(model: VisionTransformer, images: Tensor) -> tuple[Tensor, Tensor]:
    """Plain forward of (B, 3, H, W) images: (final-normed CLS (B, d), final-normed patch tokens (B, N, d))."""
    x = model.forward_features(images)
    return _split_tokens(model, x, _grid(model, images))


def forward_with_last_block_taps(model: VisionTransformer, images: Tensor) -> TeacherForward:
    """Forward (B, 3, H, W) images and also return the last block's CLS attention and per-head patch queries/keys.

    Fused attention stays on: a temporary forward hook on ``model.blocks[-1].attn.qkv`` keeps the projection output,
    from which q and k are split per head, passed through ``attn.q_norm`` / ``attn.k_norm`` and the CLS attention row
    recomputed in float32 (autocast disabled). Handles register/distillation prefix tokens and any input size the
    model's dynamic image size accepts.
    """
    check_vit(model)
    attn = model.blocks[-1].attn
    captured: list[Tensor] = []

    def hook(_module: nn.Module, _inputs: tuple[Tensor, ...], output: Tensor) -> None:
        captured.clear()
        captured.append(output.detach())

    handle = attn.qkv.register_forward_hook(hook)
    try:
        x = model.forward_features(images)
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError("the hook on blocks[-1].attn.qkv did not fire")
    grid = _grid(model, images)
    cls, patch_tokens = _split_tokens(model, x, grid)

    qkv = captured[0]
    batch, n_tokens, _ = qkv.shape
    n_heads, head_dim, n_prefix = attn.num_heads, attn.head_dim, model.num_prefix_tokens
    with torch.no_grad():
        qkv = qkv.reshape(batch, n_tokens, 3, n_heads, head_dim).permute(2, 0, 3, 1, 4)
        # q/k norms run exactly as inside timm's Attention (same dtype/autocast state), the rest in float32
        q, k = attn.q_norm(qkv[0]).float(), attn.k_norm(qkv[1]).float()  # (B, h, L, dh)
    with torch.no_grad(), torch.autocast(device_type=q.device.type, enabled=False):
        logits = (q[:, :, :1] @ k.transpose(-2, -1)).squeeze(2) * attn.scale  # (B, h, L), CLS query row
        cls_attention = logits.softmax(dim=-1)[:, :, n_prefix:]
    return TeacherForward(
        cls=cls,
        patch_tokens=patch_tokens,
        cls_attention=cls_attention.contiguous(),
        queries=q[:, :, n_prefix:].contiguous(),
        keys=k[:, :, n_prefix:].contiguous(),
        grid=grid,
    )


def last_block_tokens(
    model: VisionTransformer, images: Tensor, n: int, output_fmt: str = "NLC", prefix_tokens: bool = False
) -> list[Any]:
    """The final-normed tokens of the last ``n`` blocks (earliest first), as timm's ``forward_intermediates`` gives
    them: per block the patch tokens (``output_fmt`` "NLC" (B, N, d) or "NCHW" (B, d, h, w)), paired with the prefix
    tokens (CLS first) when ``prefix_tokens``. The one place the probes' features come from; ValueError names
    ``n_last_blocks`` when ``n`` is not in [1, depth]."""
    depth = len(model.blocks)
    if not 1 <= n <= depth:
        raise ValueError(f"n_last_blocks must be in [1, {depth}] (the backbone's depth), got {n}")
    return model.forward_intermediates(
        images,
        indices=n,
        norm=True,
        return_prefix_tokens=prefix_tokens,
        output_fmt=output_fmt,
        intermediates_only=True,
    )


def last_n_block_cls(model: VisionTransformer, images: Tensor, n: int) -> Tensor:
    """Concatenate the final-normed CLS tokens of the last ``n`` blocks (earliest first): (B, n * d).

    The linear-probe feature of DINO's ``eval_linear.py`` (n = 4 for ViT-S, spec D).
    """
    return torch.cat(
        [prefix[:, 0] for _patches, prefix in last_block_tokens(model, images, n, prefix_tokens=True)], -1
    )


def clip_tracker_inputs(taps: TeacherForward, batch: int, frames: int) -> TrackerInputs:
    """The tracker's inputs from the last-block taps of ``batch * frames`` frames (clip-major order).

    Frame 0 of each clip gives the CLS attention, the per-head queries (heads concatenated) and the tokens Z; every
    frame gives its keys (spec A.3). Used by DoRAModule in training and by ``dora visualize``.
    """

    def per_clip(x: Tensor) -> Tensor:
        return x.unflatten(0, (batch, frames))

    queries, keys = per_clip(taps.queries), per_clip(taps.keys)  # (B,T,h,N,dh)
    return TrackerInputs(
        cls_attention=per_clip(taps.cls_attention)[:, 0],
        queries=queries[:, 0].permute(0, 2, 1, 3).flatten(2),
        keys=keys.permute(0, 1, 3, 2, 4).flatten(3),
        tokens=per_clip(taps.patch_tokens)[:, 0],
    )
