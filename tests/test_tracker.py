"""Object tracker: official golden values, corrected threshold, a hand-built moving object, head sampling."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dora_lightning.core.tracker import (
    TrackerInputs,
    apply_masks,
    object_masks,
    object_prototypes,
    refine_prototypes,
    sample_heads,
    track,
    track_objects,
)

GOLDEN_NAME = "dora_official_golden.npz"
# Copy of record, next to the repository (absent on a clean clone, e.g. in CI).
SHARED_GOLDEN_DIR = Path(__file__).parents[1] / ".." / "shared" / "golden"
# Vendored copy, what the tests load; DORA_GOLDEN_DIR overrides it.
GOLDEN_DIR = Path(os.environ.get("DORA_GOLDEN_DIR", Path(__file__).parent / "golden"))

RTOL, ATOL = 1e-5, 1e-6


@pytest.fixture(scope="module")
def golden() -> dict[str, torch.Tensor]:
    with np.load(GOLDEN_DIR / GOLDEN_NAME) as data:
        return {key: torch.from_numpy(np.asarray(data[key])) for key in data.files}


def golden_inputs(g: dict[str, torch.Tensor]) -> TrackerInputs:
    """Convert the official frame-major, per-head, CLS-prefixed tensors into our batch-major TrackerInputs."""
    attn, query, key = g["mot_attn"], g["mot_query"], g["mot_key"]  # (T,B,h,N+1,N+1), (T,B,h,N+1,dh) x2
    frames, batch, heads, tokens_plus_cls, head_dim = query.shape
    n = tokens_plus_cls - 1
    cls_attention = attn[0][:, :, 0, 1:]  # frame 0, CLS row, patch columns -> (B, h, N)
    queries = (
        query[0][:, :, 1:, :].permute(0, 2, 1, 3).reshape(batch, n, heads * head_dim)
    )  # 'b h n d -> b n (h d)'
    keys = (
        key[:, :, :, 1:, :].permute(1, 0, 3, 2, 4).reshape(batch, frames, n, heads * head_dim)
    )  # (B, T, N, h*dh)
    tokens = g["mot_teacher_patches"][0]  # frame-0 final-norm patch tokens (B, N, d)
    return TrackerInputs(cls_attention=cls_attention, queries=queries, keys=keys, tokens=tokens)


def golden_call(g, **kwargs):
    return track_objects(
        golden_inputs(g),
        heads=g["mot_heads"],
        images=g["mot_images"],
        patch_size=int(g["mot_patch_size"]),
        **kwargs,
    )


# ----------------------------------------------------------------------------------------------- golden (official)


def test_golden_official_mode_reproduces_official_tensors(golden):
    out = golden_call(golden, threshold="batch")
    torch.testing.assert_close(out.sk_input, golden["mot_sk_input"], rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(out.sk_assignment, golden["mot_sk_output"], rtol=RTOL, atol=ATOL)
    expected = golden["mot_masked"].permute(1, 0, 2, 3, 4, 5)  # (k, B, T, ...) -> (B, k, T, ...)
    assert out.masked.shape == expected.shape == (2, 3, 3, 3, 64, 64)
    torch.testing.assert_close(out.masked, expected, rtol=RTOL, atol=ATOL)
    # the golden masks are not degenerate: every (clip, object, frame) keeps some patches and drops others
    kept = out.masks.flatten(-2).sum(-1)
    assert (kept > 0).all() and (kept < 16).all()


def test_golden_step_by_step_functions(golden):
    inputs = golden_inputs(golden)
    prototypes = object_prototypes(inputs.cls_attention, inputs.queries, golden["mot_heads"])
    assert prototypes.shape == (2, 3, 48)
    refined, assignment, scores = refine_prototypes(prototypes, inputs.tokens, epsilon=0.05, num_iters=30)
    torch.testing.assert_close(scores, golden["mot_sk_input"], rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(assignment, golden["mot_sk_output"], rtol=RTOL, atol=ATOL)
    maps = track(refined, inputs.keys)
    assert maps.shape == (2, 3, 3, 16)
    torch.testing.assert_close(maps.sum(-1), torch.ones(2, 3, 3))
    masks = object_masks(maps, (4, 4), threshold="batch")
    masked = apply_masks(golden["mot_images"], masks, 16)
    torch.testing.assert_close(masked, golden["mot_masked"].permute(1, 0, 2, 3, 4, 5), rtol=RTOL, atol=ATOL)


def test_corrected_default_differs_only_by_threshold(golden):
    official = golden_call(golden, threshold="batch")
    default = golden_call(golden)  # threshold="per_sample"
    torch.testing.assert_close(default.track_maps, official.track_maps, rtol=0, atol=0)
    # independent recomputation of the per-row threshold and of the nearest upsampling
    u = official.track_maps / official.track_maps.norm(dim=-1, keepdim=True)
    rows = (u > u.mean(dim=-1, keepdim=True)).float().reshape(2, 3 * 3, 4, 4)
    pixels = F.interpolate(rows, scale_factor=16, mode="nearest").reshape(2, 3, 3, 1, 64, 64)
    expected = golden["mot_images"].unsqueeze(1) * pixels
    torch.testing.assert_close(default.masked, expected, rtol=0, atol=0)
    assert not torch.equal(default.masks, official.masks)
    assert not torch.equal(default.masked, golden["mot_masked"].permute(1, 0, 2, 3, 4, 5))


def test_per_sample_threshold_is_independent_of_the_batch(golden):
    full = golden_call(golden)
    single = {**golden}
    single["mot_attn"] = golden["mot_attn"][:, 1:]
    single["mot_query"] = golden["mot_query"][:, 1:]
    single["mot_key"] = golden["mot_key"][:, 1:]
    single["mot_teacher_patches"] = golden["mot_teacher_patches"][:, 1:]
    single["mot_images"] = golden["mot_images"][1:]
    alone = golden_call(single)  # batch size 1 (the official code breaks here)
    assert alone.masked.shape == (1, 3, 3, 3, 64, 64)
    assert torch.equal(alone.masks, full.masks[1:])
    torch.testing.assert_close(alone.masked, full.masked[1:], rtol=0, atol=0)
    torch.testing.assert_close(alone.sk_assignment, full.sk_assignment[1:], rtol=RTOL, atol=ATOL)


def test_keep_and_remove_are_complementary(golden):
    keep = golden_call(golden, keep_object=True)
    remove = golden_call(golden, keep_object=False)
    assert torch.equal(keep.masks, remove.masks)
    torch.testing.assert_close(
        keep.masked + remove.masked, golden["mot_images"].unsqueeze(1).expand_as(keep.masked)
    )
    assert torch.all((keep.masked == 0) | (remove.masked == 0))


def test_fp32_under_bf16_autocast_and_bf16_inputs(golden):
    reference = golden_call(golden, threshold="batch")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = golden_call(golden, threshold="batch")
    assert under_autocast.track_maps.dtype == torch.float32
    torch.testing.assert_close(under_autocast.track_maps, reference.track_maps, rtol=0, atol=0)
    torch.testing.assert_close(under_autocast.masked, reference.masked, rtol=0, atol=0)

    inputs = golden_inputs(golden)
    bf16 = TrackerInputs(*(t.to(torch.bfloat16) for t in vars(inputs).values()))
    out = track_objects(bf16, golden["mot_heads"], golden["mot_images"], 16)
    for tensor in (out.sk_input, out.sk_assignment, out.prototypes, out.refined_prototypes, out.track_maps):
        assert tensor.dtype == torch.float32
    assert out.masked.dtype == golden["mot_images"].dtype


def test_no_grad_through_tracker(golden):
    inputs = golden_inputs(golden)
    inputs.queries.requires_grad_(True)
    out = track_objects(inputs, golden["mot_heads"], golden["mot_images"], 16)
    assert not out.masked.requires_grad and not out.prototypes.requires_grad


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_golden_on_cuda(golden):
    cuda = {key: value.cuda() for key, value in golden.items()}
    out = golden_call(cuda, threshold="batch")
    assert out.masked.device.type == "cuda"
    torch.testing.assert_close(out.sk_assignment.cpu(), golden["mot_sk_output"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(
        out.masked.cpu(), golden["mot_masked"].permute(1, 0, 2, 3, 4, 5), rtol=RTOL, atol=ATOL
    )


# ----------------------------------------------------------------------------------------- hand-built moving object

GRID, PATCH, FRAMES, HEADS, HEAD_DIM = 4, 16, 3, 4, 2  # N = 16 patches, D = 8


def block(top: int, left: int) -> torch.Tensor:
    """(4, 4) bool patch mask of the 2x2 block whose top-left patch is (top, left)."""
    mask = torch.zeros(GRID, GRID, dtype=torch.bool)
    mask[top : top + 2, left : left + 2] = True
    return mask


def moving_object_scene():
    """Frame 0 splits into four 2x2 quadrants, each seen by one head (its CLS attention, queries and tokens point along
    basis vector e_q). In the keys, quadrant 0's object moves one patch per frame: to the right in clip 0 and down in
    clip 1, with key s*e_0; every other patch has key s*e_4, orthogonal to all prototypes."""
    dim = HEADS * HEAD_DIM
    basis = torch.eye(dim)
    quadrant = torch.tensor([(r // 2) * 2 + (c // 2) for r in range(GRID) for c in range(GRID)])  # (N,)
    tokens = basis[quadrant].expand(2, -1, -1).clone()  # (B, N, D)
    queries = tokens.clone()
    cls_attention = torch.stack([(quadrant == q).float() / 4 for q in range(HEADS)]).expand(2, -1, -1).clone()
    paths = [
        [block(0, t) for t in range(FRAMES)],
        [block(t, 0) for t in range(FRAMES)],
    ]  # clip 0 right, clip 1 down
    object_at = torch.stack([torch.stack(p) for p in paths])  # (B, T, 4, 4)
    scale = 2.0
    keys = torch.where(
        object_at.reshape(2, FRAMES, -1, 1), scale * basis[0], scale * basis[4]
    )  # (B, T, N, D)
    return TrackerInputs(cls_attention, queries, keys, tokens), object_at


@pytest.mark.parametrize("threshold", ["per_sample", "batch"])
def test_moving_object_is_tracked_and_masked(threshold):
    inputs, object_at = moving_object_scene()
    heads = torch.tensor([2, 0, 3, 1])  # object 1 is seeded by head 0, which looks at quadrant 0
    images = torch.randn(2, FRAMES, 3, GRID * PATCH, GRID * PATCH, generator=torch.Generator().manual_seed(0))
    out = track_objects(inputs, heads, images, PATCH, threshold=threshold)

    quadrant0 = block(0, 0).flatten()
    assert (out.sk_assignment[:, quadrant0, 1] > 0.99).all()  # Sinkhorn-Knopp gives quadrant 0 to object 1
    assert torch.equal(
        out.masks[:, 1], object_at
    )  # the object's mask is exactly the moved 2x2 block in every frame

    pixels = (
        object_at.repeat_interleave(PATCH, -2).repeat_interleave(PATCH, -1).unsqueeze(2)
    )  # (B, T, 1, H, W)
    pixels = pixels.expand_as(images)
    kept = out.masked[:, 1]
    assert torch.equal(kept[pixels], images[pixels]) and (kept[~pixels] == 0).all()

    removed = apply_masks(images, out.masks, PATCH, keep_object=False)[:, 1]
    assert torch.equal(removed[~pixels], images[~pixels]) and (removed[pixels] == 0).all()


# ------------------------------------------------------------------------------------------------------ validation


def test_shape_errors_name_the_tensor(golden):
    inputs = golden_inputs(golden)
    images, heads = golden["mot_images"], golden["mot_heads"]
    bad_keys = TrackerInputs(inputs.cls_attention, inputs.queries, inputs.keys[:, :2], inputs.tokens)
    with pytest.raises(ValueError, match=r"inputs\.keys must have shape"):
        track_objects(bad_keys, heads, images, 16)
    bad_tokens = TrackerInputs(inputs.cls_attention, inputs.queries, inputs.keys, inputs.tokens[..., :40])
    with pytest.raises(ValueError, match=r"inputs\.tokens must have shape"):
        track_objects(bad_tokens, heads, images, 16)
    with pytest.raises(ValueError, match="not a whole number of 16-pixel patches"):
        track_objects(inputs, heads, images[..., :60], 16)
    with pytest.raises(ValueError, match=r"inputs\.cls_attention must have shape"):
        track_objects(inputs, heads, images, 8)  # 8x8 grid: 64 patches, but the teacher saw 16
    with pytest.raises(
        ValueError, match=r"k objects \(k=7\) must be <= number of heads in the last block \(6\)"
    ):
        track_objects(inputs, torch.arange(7), images, 16)
    with pytest.raises(ValueError, match="distinct"):
        track_objects(inputs, torch.tensor([1, 1, 2]), images, 16)
    with pytest.raises(ValueError, match=r"heads must lie in \[0, 6\)"):
        track_objects(inputs, torch.tensor([0, 6]), images, 16)
    with pytest.raises(ValueError, match="grid 3x5 does not match the N=16 patches"):
        object_masks(torch.rand(1, 1, 1, 16), (3, 5))
    with pytest.raises(ValueError, match="threshold must be"):
        object_masks(torch.rand(1, 1, 1, 16), (4, 4), threshold="global")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="does not cover images"):
        apply_masks(images, torch.ones(2, 1, 3, 4, 4, dtype=torch.bool), 8)


# ---------------------------------------------------------------------------------------------------- sample_heads


def test_sample_heads_distinct_in_range_and_deterministic():
    draws = [sample_heads(6, 3, torch.Generator().manual_seed(seed)) for seed in range(50)]
    for heads in draws:
        assert heads.dtype == torch.long and heads.shape == (3,)
        assert len(set(heads.tolist())) == 3
        assert 0 <= heads.min() and heads.max() < 6
    assert torch.equal(sample_heads(6, 3, torch.Generator().manual_seed(7)), draws[7])
    assert len({tuple(h.tolist()) for h in draws}) > 10  # actually random across seeds
    generator = torch.Generator().manual_seed(0)
    assert not all(
        torch.equal(sample_heads(6, 3, generator), draws[0]) for _ in range(5)
    )  # advances per call
    assert sorted(sample_heads(6, 6, torch.Generator().manual_seed(1)).tolist()) == list(range(6))


def test_sample_heads_rejects_too_many_objects():
    with pytest.raises(
        ValueError, match=r"^k objects \(k=7\) must be <= number of heads in the last block \(6\)$"
    ):
        sample_heads(6, 7, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError):
        sample_heads(6, 0, torch.Generator().manual_seed(0))
