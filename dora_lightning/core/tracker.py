"""DoRA multi-object tracker (spec section A.3): discover k objects in frame 0, track them through the clip, mask frames.

Pure torch, no Lightning. Shapes (batch-major, unlike the official code's frame-major lists):
B clips, T frames, h heads of the teacher's last block, head dim dh, D = h*dh, N patches on a (gh, gw) grid, k objects.

Pipeline (:func:`track_objects`):
1. :func:`object_prototypes` - P_i = sum_n A_cls[head_i, n] * Q0_n, CLS->patch attention of one head pooling the
   frame-0 patch queries (unnormalised).
2. :func:`refine_prototypes` - S = normalize(Z0) @ P^T, M = SinkhornKnopp(S), P' = M^T @ normalize(Z0).
3. :func:`track` - T_{i,t} = softmax_N(P'_i K_t^T / sqrt(D)), the same frame-0 prototypes for every frame.
4. :func:`object_masks` - u = T/||T||_2, mask = u > mean(u) (per clip row by default; batch-wide in official mode).
5. :func:`apply_masks` - nearest-upsample the patch masks and multiply the (normalised) frames; keep or remove the object.

Everything runs in float32 with autocast disabled, under ``no_grad`` (the tracker only builds inputs for the student).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from .precision import fp32_region
from .sinkhorn import sinkhorn_knopp

__all__ = [
    "TrackerInputs",
    "TrackerOutput",
    "apply_masks",
    "head_seed",
    "object_masks",
    "object_prototypes",
    "refine_prototypes",
    "sample_heads",
    "track",
    "track_objects",
]

Threshold = Literal["per_sample", "batch"]


@dataclass
class TrackerInputs:
    """Teacher quantities the tracker needs (all from the teacher's last block / final norm, detached).

    Attributes:
        cls_attention: (B, h, N) frame-0 attention of the CLS token to the N patches, per head (softmax rows of the
            last block with the CLS column dropped, i.e. ``attn[:, :, 0, 1:]``).
        queries: (B, N, h*dh) frame-0 patch queries of the last block, heads concatenated ('b h n d -> b n (h d)').
        keys: (B, T, N, h*dh) patch keys of the last block for every frame, heads concatenated.
        tokens: (B, N, d) frame-0 patch tokens after the final LayerNorm (Z); d must equal h*dh.
    """

    cls_attention: Tensor
    queries: Tensor
    keys: Tensor
    tokens: Tensor


@dataclass
class TrackerOutput:
    """Everything :func:`track_objects` computed, for the student and for logging/debugging.

    Attributes:
        masked: (B, k, T, 3, H, W) masked views, in the images' dtype.
        masks: (B, k, T, gh, gw) bool patch masks (True = tracked object).
        track_maps: (B, k, T, N) float32 cross-attention maps (softmax over N).
        sk_assignment: (B, N, k) Sinkhorn-Knopp assignment of frame-0 patches to objects.
        sk_input: (B, N, k) cosine-like scores fed to Sinkhorn-Knopp.
        prototypes: (B, k, h*dh) frame-0 object prototypes P (unnormalised).
        refined_prototypes: (B, k, h*dh) refined prototypes P' used for tracking.
        heads: (k,) long, the heads that seeded the prototypes.
    """

    masked: Tensor
    masks: Tensor
    track_maps: Tensor
    sk_assignment: Tensor
    sk_input: Tensor
    prototypes: Tensor
    refined_prototypes: Tensor
    heads: Tensor


def _check_shape(name: str, tensor: Tensor, expected: tuple[int | None, ...], layout: str) -> None:
    """Raise a one-line ValueError naming ``tensor`` when its shape does not match ``expected`` (None = any size)."""
    if not isinstance(tensor, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    shape = tuple(tensor.shape)
    ok = len(shape) == len(expected) and all(
        e is None or e == s for e, s in zip(expected, shape, strict=True)
    )
    if not ok:
        want = ", ".join("?" if e is None else str(e) for e in expected)
        raise ValueError(f"{name} must have shape {layout} = ({want}), got {shape}")
    if not tensor.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {tensor.dtype}")


def _check_heads(heads: Tensor, num_heads: int) -> Tensor:
    """Validate the (k,) head indices against ``num_heads``; return them as a long tensor."""
    if not isinstance(heads, Tensor):
        heads = torch.as_tensor(heads)
    if heads.ndim != 1 or heads.numel() == 0:
        raise ValueError(
            f"heads must be a non-empty 1-D tensor of head indices, got shape {tuple(heads.shape)}"
        )
    if heads.is_floating_point() or heads.is_complex() or heads.dtype == torch.bool:
        raise ValueError(f"heads must hold integer head indices, got dtype {heads.dtype}")
    k = heads.numel()
    if k > num_heads:
        raise ValueError(f"k objects (k={k}) must be <= number of heads in the last block ({num_heads})")
    values = heads.tolist()
    if min(values) < 0 or max(values) >= num_heads:
        raise ValueError(f"heads must lie in [0, {num_heads}), got {values}")
    if len(set(values)) != k:
        raise ValueError(f"heads must be distinct, got {values}")
    return heads.to(torch.long)


def head_seed(seed: int, rank: int, draw: int) -> int:
    """Seed of the generator for head draw number ``draw`` (0, 1, ...) of process ``rank``.

    Each process has its own stream keyed by ``seed + rank`` (the released code seeds each GPU with ``seed + rank``),
    and each draw gets a fresh generator seeded by a hash of (``seed + rank``, ``draw``): a draw depends on nothing but
    these numbers, so a resumed run (on any rank) only needs the draw count, which is the same on every rank.
    """
    digest = hashlib.blake2b(f"{seed + rank}:{draw}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # 63 bits: a valid manual_seed


def sample_heads(num_heads: int, k: int, generator: torch.Generator) -> Tensor:
    """Draw k distinct heads of the last block to seed the k object prototypes (one draw per step, seeded).

    Returns a (k,) long tensor on ``generator``'s device. Replaces the official unseeded ``random.sample``.
    """
    if num_heads < 1:
        raise ValueError(f"num_heads must be >= 1, got {num_heads}")
    if k < 1:
        raise ValueError(f"k objects must be >= 1, got {k}")
    if k > num_heads:
        raise ValueError(f"k objects (k={k}) must be <= number of heads in the last block ({num_heads})")
    return torch.randperm(num_heads, generator=generator, device=generator.device)[:k]


@torch.no_grad()
def object_prototypes(cls_attention: Tensor, queries: Tensor, heads: Tensor) -> Tensor:
    """Object prototypes P (B, k, h*dh): each chosen head's CLS->patch attention pools the frame-0 patch queries.

    Args:
        cls_attention: (B, h, N) frame-0 CLS->patch attention per head.
        queries: (B, N, h*dh) frame-0 patch queries, heads concatenated.
        heads: (k,) distinct head indices; object i is seeded by head ``heads[i]``.

    Returns:
        (B, k, h*dh) float32, unnormalised (as in the official code).
    """
    _check_shape("cls_attention", cls_attention, (None, None, None), "(B, h, N)")
    batch, num_heads, num_patches = cls_attention.shape
    _check_shape("queries", queries, (batch, num_patches, None), "(B, N, h*dh)")
    # the chosen heads sliced by number: an index tensor on the device would be a blocking copy from the host
    chosen = _check_heads(heads, num_heads).tolist()
    with fp32_region(cls_attention.device):
        attn = torch.stack([cls_attention[:, head] for head in chosen], dim=1).to(torch.float32)  # (B, k, N)
        return torch.einsum("bkn,bnd->bkd", attn, queries.to(torch.float32))


@torch.no_grad()
def refine_prototypes(
    prototypes: Tensor, tokens: Tensor, epsilon: float = 0.05, num_iters: int = 30, log_domain: bool = False
) -> tuple[Tensor, Tensor, Tensor]:
    """Refine prototypes by a balanced (Sinkhorn-Knopp) assignment of frame-0 output tokens to objects.

    S = normalize(Z) @ P^T; M = sinkhorn_knopp(S); P' = M^T @ normalize(Z) (a sum over patches, not a mean).
    This makes the k objects claim disjoint, equally sized sets of patches before tracking.

    Args:
        prototypes: (B, k, D) prototypes P.
        tokens: (B, N, D) frame-0 final-norm patch tokens Z.

    Returns:
        ``(refined, assignment, scores)``: (B, k, D) P', (B, N, k) Sinkhorn-Knopp assignment M, (B, N, k) its input S;
        all float32.
    """
    _check_shape("prototypes", prototypes, (None, None, None), "(B, k, D)")
    batch, _, dim = prototypes.shape
    _check_shape("tokens", tokens, (batch, None, dim), "(B, N, D)")
    with fp32_region(prototypes.device):
        z = tokens.to(torch.float32)
        z = z / z.norm(dim=-1, keepdim=True)
        scores = z @ prototypes.to(torch.float32).transpose(-2, -1)  # (B, N, k)
        assignment = sinkhorn_knopp(scores, epsilon=epsilon, num_iters=num_iters, log_domain=log_domain)
        refined = assignment.transpose(-2, -1) @ z  # (B, k, D)
    return refined, assignment, scores


@torch.no_grad()
def track(refined: Tensor, keys: Tensor) -> Tensor:
    """Track maps (B, k, T, N): cross-attention of each refined prototype to every frame's patch keys.

    T_{i,t} = softmax over N of P'_i K_t^T * D**-0.5, with D = h*dh the full key width (as in the official code).
    """
    _check_shape("refined", refined, (None, None, None), "(B, k, D)")
    batch, _, dim = refined.shape
    _check_shape("keys", keys, (batch, None, None, dim), "(B, T, N, D)")
    with fp32_region(refined.device):
        logits = torch.einsum("bkd,btnd->bktn", refined.to(torch.float32), keys.to(torch.float32))
        return (logits * dim**-0.5).softmax(dim=-1)


@torch.no_grad()
def object_masks(track_maps: Tensor, grid: tuple[int, int], threshold: Threshold = "per_sample") -> Tensor:
    """Binary patch masks (B, k, T, gh, gw) from track maps: u = row / ||row||_2, mask = u > mean(u).

    ``threshold="per_sample"`` (default, corrected) averages u over the N patches of each (clip, object, frame) row, so
    a clip's mask does not depend on the other clips in the batch. ``threshold="batch"`` reproduces the official code,
    which averages over all B*N entries of an (object, frame).
    """
    _check_shape("track_maps", track_maps, (None, None, None, None), "(B, k, T, N)")
    batch, k, frames, num_patches = track_maps.shape
    grid_h, grid_w = (int(g) for g in grid)
    if grid_h * grid_w != num_patches:
        raise ValueError(f"grid {grid_h}x{grid_w} does not match the N={num_patches} patches of track_maps")
    with fp32_region(track_maps.device):
        maps = track_maps.to(torch.float32)
        u = maps / maps.norm(dim=-1, keepdim=True)
        if threshold == "per_sample":
            mean = u.mean(dim=-1, keepdim=True)
        elif threshold == "batch":
            mean = u.mean(dim=(0, 3), keepdim=True)
        else:
            raise ValueError(f"threshold must be 'per_sample' or 'batch', got {threshold!r}")
        return (u > mean).reshape(batch, k, frames, grid_h, grid_w)


@torch.no_grad()
def apply_masks(images: Tensor, masks: Tensor, patch_size: int, keep_object: bool = True) -> Tensor:
    """Masked views (B, k, T, C, H, W): each patch mask upsampled (nearest, x patch_size) multiplies the frames.

    ``keep_object=True`` keeps the tracked object and zeroes the rest (official); ``False`` removes the object instead
    (spec G.2). Pixels are multiplied by exactly 0 or 1, so the result keeps the images' dtype. On normalised images
    zero is the mean colour.
    """
    _check_shape("images", images, (None, None, None, None, None), "(B, T, C, H, W)")
    batch, frames, _, height, width = images.shape
    if not isinstance(masks, Tensor) or masks.ndim != 5:
        shape = tuple(masks.shape) if isinstance(masks, Tensor) else type(masks).__name__
        raise ValueError(f"masks must have shape (B, k, T, gh, gw), got {shape}")
    if masks.shape[0] != batch or masks.shape[2] != frames:
        raise ValueError(
            f"masks (B, k, T, gh, gw) = {tuple(masks.shape)} does not match images (B, T, ...) = {tuple(images.shape)}"
        )
    if patch_size < 1:
        raise ValueError(f"patch_size must be >= 1, got {patch_size}")
    grid_h, grid_w = masks.shape[-2:]
    if grid_h * patch_size != height or grid_w * patch_size != width:
        raise ValueError(
            f"masks grid {grid_h}x{grid_w} x patch_size {patch_size} does not cover images of size {height}x{width}"
        )
    keep = masks.to(torch.bool) if keep_object else ~masks.to(torch.bool)
    pixels = keep.repeat_interleave(patch_size, dim=-2).repeat_interleave(
        patch_size, dim=-1
    )  # (B, k, T, H, W)
    return images.unsqueeze(1) * pixels.unsqueeze(3).to(images.dtype)


@torch.no_grad()
def track_objects(
    inputs: TrackerInputs,
    heads: Tensor,
    images: Tensor,
    patch_size: int,
    epsilon: float = 0.05,
    num_iters: int = 30,
    threshold: Threshold = "per_sample",
    keep_object: bool = True,
    log_domain_sinkhorn: bool = False,
) -> TrackerOutput:
    """Full DoRA tracker: discover k objects in frame 0, track them over the T frames and mask the clip per object.

    Args:
        inputs: teacher attention/queries/keys/tokens, see :class:`TrackerInputs`.
        heads: (k,) distinct last-block heads seeding the objects (e.g. from :func:`sample_heads`).
        images: (B, T, 3, H, W) normalised frames with H = gh*patch_size and W = gw*patch_size.
        patch_size: ViT patch size in pixels.
        epsilon, num_iters: Sinkhorn-Knopp settings.
        threshold: "per_sample" (default, corrected) or "batch" (official batch-wide mean).
        keep_object: keep the object (official) or remove it.
        log_domain_sinkhorn: run Sinkhorn-Knopp on log-probabilities (no underflow to NaN; the corrected default).

    Returns:
        :class:`TrackerOutput` with the masked views (B, k, T, 3, H, W) and every intermediate.
    """
    _check_shape("images", images, (None, None, None, None, None), "(B, T, C, H, W)")
    batch, frames, _, height, width = images.shape
    if patch_size < 1 or height % patch_size or width % patch_size:
        raise ValueError(
            f"images of size {height}x{width} are not a whole number of {patch_size}-pixel patches"
        )
    grid = (height // patch_size, width // patch_size)
    num_patches = grid[0] * grid[1]

    _check_shape("inputs.cls_attention", inputs.cls_attention, (batch, None, num_patches), "(B, h, N)")
    num_heads = inputs.cls_attention.shape[1]
    _check_shape("inputs.queries", inputs.queries, (batch, num_patches, None), "(B, N, h*dh)")
    dim = inputs.queries.shape[-1]
    if dim % num_heads:
        raise ValueError(
            f"inputs.queries width {dim} is not a multiple of the {num_heads} heads of cls_attention"
        )
    _check_shape("inputs.keys", inputs.keys, (batch, frames, num_patches, dim), "(B, T, N, h*dh)")
    _check_shape("inputs.tokens", inputs.tokens, (batch, num_patches, dim), "(B, N, d=h*dh)")
    heads = _check_heads(heads, num_heads)

    prototypes = object_prototypes(inputs.cls_attention, inputs.queries, heads)
    refined, assignment, scores = refine_prototypes(
        prototypes, inputs.tokens, epsilon, num_iters, log_domain_sinkhorn
    )
    maps = track(refined, inputs.keys)
    masks = object_masks(maps, grid, threshold)
    masked = apply_masks(images, masks, patch_size, keep_object)
    return TrackerOutput(
        masked=masked,
        masks=masks,
        track_maps=maps,
        sk_assignment=assignment,
        sk_input=scores,
        prototypes=prototypes,
        refined_prototypes=refined,
        heads=heads,
    )


SK_EPSILON, SK_ITERATIONS = 0.05, 30  # Sinkhorn-Knopp defaults of the spec (A.4) and the official code


@dataclass(frozen=True)
class TrackingOptions:
    """The tracker's settings as the config names them, mapped to :func:`track_objects` in one place (training and
    ``dora visualize``): ``official_compat`` selects the official code's batch-wide mask threshold and plain-domain
    Sinkhorn-Knopp; otherwise per-clip thresholds and log-domain iterations."""

    epsilon: float = SK_EPSILON
    iterations: int = SK_ITERATIONS
    official_compat: bool = False
    keep_object: bool = True

    def track(self, inputs: TrackerInputs, heads: Tensor, images: Tensor, patch_size: int) -> TrackerOutput:
        """:func:`track_objects` with these settings."""
        return track_objects(
            inputs,
            heads,
            images,
            patch_size,
            epsilon=self.epsilon,
            num_iters=self.iterations,
            threshold="batch" if self.official_compat else "per_sample",
            keep_object=self.keep_object,
            log_domain_sinkhorn=not self.official_compat,
        )
