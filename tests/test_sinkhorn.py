"""Sinkhorn-Knopp: official golden values, marginals, invariances, precision, batch size 1."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from dora_lightning.core.sinkhorn import sinkhorn_knopp

GOLDEN_NAME = "dora_official_golden.npz"
# Copy of record, next to the repository (absent on a clean clone, e.g. in CI).
SHARED_GOLDEN_DIR = Path(__file__).parents[1] / ".." / "shared" / "golden"
# Vendored copy, what the tests load; DORA_GOLDEN_DIR overrides it.
GOLDEN_DIR = Path(os.environ.get("DORA_GOLDEN_DIR", Path(__file__).parent / "golden"))


@pytest.fixture(scope="module")
def golden() -> dict[str, np.ndarray]:
    with np.load(GOLDEN_DIR / GOLDEN_NAME) as data:
        return {key: data[key] for key in data.files}


def test_matches_official_golden(golden):
    logits = torch.from_numpy(golden["sk_logits"])
    out = sinkhorn_knopp(logits)
    assert out.shape == logits.shape and out.dtype == torch.float32
    torch.testing.assert_close(out, torch.from_numpy(golden["sk_assignment"]), rtol=1e-5, atol=1e-6)


def test_matches_official_golden_tracker_call(golden):
    out = sinkhorn_knopp(torch.from_numpy(golden["mot_sk_input"]), epsilon=0.05, num_iters=30)
    torch.testing.assert_close(out, torch.from_numpy(golden["mot_sk_output"]), rtol=1e-5, atol=1e-6)


def test_vendored_golden_matches_shared_copy():
    shared = SHARED_GOLDEN_DIR / GOLDEN_NAME
    if not shared.exists():
        pytest.skip("no ../shared/golden next to the repository")
    assert (GOLDEN_DIR / GOLDEN_NAME).read_bytes() == shared.read_bytes()


@pytest.mark.parametrize("shape", [(3, 12, 4), (2, 7, 3), (1, 16, 2)])
def test_marginals(shape):
    batch, n, k = shape
    scores = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 0.2
    out = sinkhorn_knopp(scores, num_iters=200)
    # rows (patches) are normalised last, so they sum to 1 up to rounding whatever the iteration count
    torch.testing.assert_close(out.sum(-1), torch.ones(batch, n), rtol=0, atol=1e-5)
    # columns (prototypes) converge to the equipartition N/K
    torch.testing.assert_close(out.sum(-2), torch.full((batch, k), n / k), rtol=0, atol=1e-4)
    assert (out >= 0).all()


def test_default_iterations_rows_exact_columns_close():
    scores = torch.randn(4, 20, 5, generator=torch.Generator().manual_seed(1)) * 0.1
    out = sinkhorn_knopp(scores)
    torch.testing.assert_close(out.sum(-1), torch.ones(4, 20), rtol=0, atol=1e-5)
    torch.testing.assert_close(out.sum(-2), torch.full((4, 5), 4.0), rtol=0, atol=0.05)


def test_no_cross_sample_coupling():
    gen = torch.Generator().manual_seed(2)
    scores = torch.randn(3, 10, 4, generator=gen) * 0.3
    together = sinkhorn_knopp(scores)
    alone = torch.cat([sinkhorn_knopp(scores[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(together, alone, rtol=1e-6, atol=1e-7)


def test_invariant_to_per_sample_constant():
    gen = torch.Generator().manual_seed(3)
    scores = torch.randn(3, 10, 4, generator=gen) * 0.3
    shift = torch.tensor([-5.0, 0.7, 12.0]).view(3, 1, 1)
    torch.testing.assert_close(sinkhorn_knopp(scores + shift), sinkhorn_knopp(scores), rtol=1e-4, atol=1e-5)


def test_fp32_output_for_bf16_input_and_under_autocast():
    gen = torch.Generator().manual_seed(4)
    scores = (torch.randn(2, 16, 3, generator=gen) * 0.3).to(torch.bfloat16)
    expected = sinkhorn_knopp(scores.float())
    out = sinkhorn_knopp(scores)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_autocast = sinkhorn_knopp(scores)
    assert out_autocast.dtype == torch.float32
    torch.testing.assert_close(out_autocast, expected)


def test_batch_size_one_and_no_grad():
    scores = torch.randn(1, 9, 3, generator=torch.Generator().manual_seed(5), requires_grad=True)
    out = sinkhorn_knopp(scores)
    assert out.shape == (1, 9, 3)
    assert not out.requires_grad
    assert torch.isfinite(out).all()


def test_low_epsilon_gives_hard_balanced_assignment():
    # 4 patches, 2 prototypes: patches 0,1 prefer prototype 0 and patches 2,3 prototype 1
    scores = torch.tensor([[[1.0, 0.0], [0.9, 0.1], [0.2, 0.8], [0.0, 1.0]]])
    out = sinkhorn_knopp(scores, epsilon=0.05, num_iters=100)
    assert out.argmax(-1).tolist() == [[0, 0, 1, 1]]
    assert (out.max(-1).values > 0.99).all()


def test_input_validation():
    with pytest.raises(ValueError, match="scores must have shape"):
        sinkhorn_knopp(torch.zeros(4, 3))
    with pytest.raises(ValueError, match="epsilon"):
        sinkhorn_knopp(torch.zeros(1, 4, 3), epsilon=0.0)
    with pytest.raises(ValueError, match="floating-point"):
        sinkhorn_knopp(torch.zeros(1, 4, 3, dtype=torch.long))


def test_log_domain_equals_official_where_nothing_underflows():
    golden = np.load(GOLDEN_DIR / GOLDEN_NAME)
    logits = torch.from_numpy(golden["sk_logits"])
    official = sinkhorn_knopp(logits)
    torch.testing.assert_close(sinkhorn_knopp(logits, log_domain=True), official, rtol=1e-4, atol=1e-6)


def test_log_domain_survives_scores_that_make_the_official_arithmetic_nan():
    scores = torch.zeros(1, 4, 2)
    scores[0, 0] = 5.3  # every other patch lies more than 104 * eps below the maximum
    assert torch.isnan(sinkhorn_knopp(scores)).any()
    stable = sinkhorn_knopp(scores, log_domain=True)
    assert torch.isfinite(stable).all()
    torch.testing.assert_close(stable.sum(-1), torch.ones(1, 4))
