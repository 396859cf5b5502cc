"""Tests of dora_lightning.core.loss against the official golden tensors and direct loop evaluations."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dora_lightning.core.loss import LossParts, dino_loss, dora_loss, teacher_entropy, update_center

GOLDEN = Path(__file__).parent / "golden" / "dora_official_golden.npz"
N_LOCAL_GOLDEN = 6


@pytest.fixture(scope="module")
def golden() -> dict[str, torch.Tensor]:
    data = np.load(GOLDEN)
    out = {k: torch.from_numpy(np.asarray(data[k])) for k in data.files if k.startswith("loss_")}
    t_frames, vb, dim = out["loss_student_local"].shape
    batch = vb // N_LOCAL_GOLDEN
    # official layout (T, 6B, D), crop-major along dim 1 -> (V, T, B, D)
    out["local_vtbd"] = (
        out["loss_student_local"].reshape(t_frames, N_LOCAL_GOLDEN, batch, dim).permute(1, 0, 2, 3)
    )
    return out


def _h(p_teacher: torch.Tensor, student: torch.Tensor, student_temp: float) -> torch.Tensor:
    """Batch-mean cross-entropy H(p, softmax(s/temp)) in float64, written out plainly."""
    q = torch.softmax(student.double() / student_temp, dim=-1)
    return (-(p_teacher.double() * q.log()).sum(dim=-1)).mean()


def _reference_dora(tg, masked, local, center, tt, st=0.1) -> float:
    k, t_frames = masked.shape[:2]
    n_local = local.shape[0]
    total = 0.0
    for j in range(k):
        for t in range(t_frames):
            p = torch.softmax((tg[t].double() - center.double()) / tt, dim=-1)
            lm = _h(p, masked[j, t], st)
            if n_local:
                ll = sum(_h(p, local[v, t], st) for v in range(n_local)) / n_local
                total += 0.5 * (lm + ll)
            else:
                total += lm
    return float(total / (k * t_frames))


def _random_inputs(k=3, t=4, b=5, v=4, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(t, b, d, generator=g) * 3,
        torch.randn(k, t, b, d, generator=g) * 3,
        torch.randn(v, t, b, d, generator=g) * 3,
        torch.randn(1, d, generator=g),
    )


@pytest.mark.parametrize("epoch", [0, 3])
def test_official_compat_reproduces_golden_loss(golden, epoch):
    tt = float(golden["loss_teacher_temp_schedule"][epoch])
    parts = dora_loss(
        golden["loss_teacher_global"],
        golden["loss_student_masked"],
        golden["local_vtbd"],
        golden["loss_center_before"],
        teacher_temp=tt,
        official_compat=True,
    )
    expected = float(golden[f"loss_value_epoch{epoch}"])
    assert parts.total.dtype == torch.float32
    assert parts.total.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("epoch", [0, 3])
def test_update_center_reproduces_golden(golden, epoch):
    new = update_center(golden["loss_center_before"], golden["loss_teacher_global"], momentum=0.9)
    assert new.shape == (1, golden["loss_teacher_global"].shape[-1])
    torch.testing.assert_close(new, golden[f"loss_center_after_epoch{epoch}"], rtol=1e-5, atol=1e-7)


def test_corrected_differs_from_compat_on_golden(golden):
    args = (golden["loss_teacher_global"], golden["loss_student_masked"], golden["local_vtbd"])
    center = golden["loss_center_before"]
    corrected = dora_loss(*args, center, teacher_temp=0.04)
    compat = dora_loss(*args, center, teacher_temp=0.04, official_compat=True)
    ref = _reference_dora(*args, center, 0.04)
    assert corrected.total.item() == pytest.approx(ref, rel=1e-5)
    assert abs(corrected.total.item() - compat.total.item()) > 1.0
    # parts: same masked term in both modes; compat's local term omits crop 0
    torch.testing.assert_close(corrected.masked, compat.masked)
    assert corrected.local.item() != pytest.approx(compat.local.item(), rel=1e-4)
    expected_compat_local = np.mean(
        [
            _h(
                torch.softmax((golden["loss_teacher_global"][t] - center) / 0.04, dim=-1),
                golden["local_vtbd"][v, t],
                0.1,
            )
            for t in range(golden["local_vtbd"].shape[1])
            for v in range(1, N_LOCAL_GOLDEN)
        ]
    )
    assert compat.local.item() == pytest.approx(expected_compat_local, rel=1e-5)


@pytest.mark.parametrize(
    "shape", [dict(k=3, t=4, b=5, v=4), dict(k=1, t=2, b=3, v=1), dict(k=2, t=3, b=2, v=6)]
)
def test_corrected_dora_loss_equals_double_loop(shape):
    tg, masked, local, center = _random_inputs(**shape)
    parts = dora_loss(tg, masked, local, center, teacher_temp=0.07, student_temp=0.1)
    assert isinstance(parts, LossParts)
    assert parts.total.item() == pytest.approx(_reference_dora(tg, masked, local, center, 0.07), rel=1e-5)
    # logging parts are the two plain means; total is their average when V > 0
    assert parts.total.item() == pytest.approx(0.5 * (parts.masked.item() + parts.local.item()), rel=1e-5)


def test_dora_loss_without_local_crops_is_masked_term():
    tg, masked, local, center = _random_inputs(v=0)
    assert local.shape[0] == 0
    parts = dora_loss(tg, masked, local, center, teacher_temp=0.04)
    assert parts.local is None
    assert parts.total.item() == pytest.approx(_reference_dora(tg, masked, local, center, 0.04), rel=1e-5)
    torch.testing.assert_close(parts.total, parts.masked)


def test_official_compat_matches_literal_aggregation():
    """The unreset frame sum, written the way the official loop runs it, on random tensors."""
    tg, masked, local, center = _random_inputs(k=3, t=4, b=2, v=3, seed=1)
    k, t_frames = masked.shape[:2]
    frame_loss, total = 0.0, 0.0
    for j in range(k):
        for t in range(t_frames):
            p = torch.softmax((tg[t].double() - center.double()) / 0.05, dim=-1)
            lm = _h(p, masked[j, t], 0.1)
            ll = sum(_h(p, local[v, t], 0.1) for v in range(1, local.shape[0])) / (local.shape[0] - 1)
            frame_loss += 0.5 * (lm + ll)
        frame_loss /= t_frames
        total += frame_loss
    expected = float(total / k)
    got = dora_loss(tg, masked, local, center, teacher_temp=0.05, official_compat=True)
    assert got.total.item() == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="local crops"):
        dora_loss(tg, masked, local[:1], center, teacher_temp=0.05, official_compat=True)


def test_dora_loss_fp32_and_teacher_detached():
    tg, masked, local, center = _random_inputs()
    tg = tg.bfloat16().requires_grad_()
    masked = masked.bfloat16().requires_grad_()
    local = local.bfloat16().requires_grad_()
    parts = dora_loss(tg, masked, local, center, teacher_temp=0.04)
    assert parts.total.dtype == torch.float32
    parts.total.backward()
    assert tg.grad is None
    assert masked.grad is not None and local.grad is not None
    expected = _reference_dora(
        tg.detach().float(), masked.detach().float(), local.detach().float(), center, 0.04
    )
    assert parts.total.item() == pytest.approx(expected, rel=1e-5)


def test_dora_loss_rejects_mismatched_shapes():
    tg, masked, local, center = _random_inputs()
    with pytest.raises(ValueError, match="student_masked"):
        dora_loss(tg, masked[:, :2], local, center, teacher_temp=0.04)


def _reference_dino(tgs, sgs, local, center, tt, st=0.1) -> tuple[float, float, float]:
    n_global, t_frames = tgs.shape[:2]
    gg, gl = [], []
    for g in range(n_global):
        for t in range(t_frames):
            p = torch.softmax((tgs[g, t].double() - center.double()) / tt, dim=-1)
            for s in range(n_global):
                if s != g:
                    gg.append(_h(p, sgs[s, t], st))
            for v in range(local.shape[0]):
                gl.append(_h(p, local[v, t], st))
    mean = lambda xs: float(np.mean(xs)) if xs else float("nan")  # noqa: E731
    return mean(gg + gl), mean(gg), mean(gl)


def test_dino_loss_equals_direct_loop():
    g = torch.Generator().manual_seed(3)
    tgs = torch.randn(2, 3, 4, 16, generator=g) * 3
    sgs = torch.randn(2, 3, 4, 16, generator=g) * 3
    local = torch.randn(5, 3, 4, 16, generator=g) * 3
    center = torch.randn(1, 16, generator=g)
    parts = dino_loss(tgs, sgs, local, center, teacher_temp=0.04)
    total, gg, gl = _reference_dino(tgs, sgs, local, center, 0.04)
    assert parts.total.item() == pytest.approx(total, rel=1e-5)
    assert parts.masked.item() == pytest.approx(gg, rel=1e-5)
    assert parts.local.item() == pytest.approx(gl, rel=1e-5)
    # G = 1: only global-local pairs
    one = dino_loss(tgs[:1], sgs[:1], local, center, teacher_temp=0.04)
    assert one.masked is None
    assert one.total.item() == pytest.approx(
        _reference_dino(tgs[:1], sgs[:1], local, center, 0.04)[0], rel=1e-5
    )


def test_teacher_entropy():
    d = 32
    uniform = torch.zeros(3, 4, d)
    assert teacher_entropy(uniform, torch.zeros(1, d), 0.04).item() == pytest.approx(math.log(d), rel=1e-6)
    # the centre is subtracted before sharpening: centring a constant offset away gives uniform again
    center = torch.randn(1, d)
    assert teacher_entropy(uniform + center, center, 0.04).item() == pytest.approx(math.log(d), rel=1e-5)
    peaked = torch.zeros(2, d)
    peaked[:, 0] = 10.0
    assert teacher_entropy(peaked, torch.zeros(1, d), 0.04).item() < 1e-3


def test_update_center_single_process_formula():
    g = torch.Generator().manual_seed(4)
    center = torch.randn(1, 8, generator=g)
    logits = torch.randn(3, 5, 8, generator=g).bfloat16()
    new = update_center(center, logits, momentum=0.8)
    expected = 0.8 * center + 0.2 * logits.float().reshape(-1, 8).mean(dim=0, keepdim=True)
    assert new.dtype == torch.float32
    torch.testing.assert_close(new, expected)


def _center_worker(
    rank: int, world: int, init_file: str, out_dir: str, rows: torch.Tensor, center: torch.Tensor
):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        half = rows.shape[0] // 2
        mine = rows[:half] if rank == 0 else rows[half:]
        equal = update_center(center, mine.reshape(-1, 2, rows.shape[-1]), momentum=0.9)
        # unequal row counts per rank must still average over the global row count
        mine_uneq = rows[:3] if rank == 0 else rows[3:]
        unequal = update_center(center, mine_uneq, momentum=0.9)
        torch.save({"equal": equal, "unequal": unequal}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_update_center_two_process_gloo_matches_single_process(tmp_path):
    g = torch.Generator().manual_seed(5)
    rows = torch.randn(12, 8, generator=g)
    center = torch.randn(1, 8, generator=g)
    mp.spawn(
        _center_worker,
        args=(2, str(tmp_path / "init"), str(tmp_path), rows, center),
        nprocs=2,
        join=True,
    )
    single = update_center(center, rows, momentum=0.9)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(got["equal"], single, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(got["unequal"], single, rtol=1e-6, atol=1e-7)
