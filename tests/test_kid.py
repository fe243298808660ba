"""KID: the unbiased MMD^2 estimator with the cubic polynomial kernel, over random subsets."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import dallm.eval.kid as kid_module
from dallm.eval.kid import kid, subset_for, subset_indices


def kid_by_loops(a: np.ndarray, b: np.ndarray, m: int, subsets) -> tuple[float, float]:
    """The estimator written out with explicit sums over pairs (no matrix algebra)."""
    d = a.shape[1]

    def k(x, y) -> float:
        return (sum(float(xi) * float(yi) for xi, yi in zip(x, y, strict=True)) / d + 1.0) ** 3

    values = []
    for ia, ib in subsets:
        x, y = a[ia], b[ib]
        kxx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j)
        kyy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j)
        kxy = sum(k(x[i], y[j]) for i in range(m) for j in range(m))
        values.append(kxx / (m * (m - 1)) + kyy / (m * (m - 1)) - 2.0 * kxy / (m * m))
    mean = sum(values) / len(values)
    std = (sum((v - mean) ** 2 for v in values) / len(values)) ** 0.5
    return mean, std


def gaussian(n: int, d: int, shift: float, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(shift, 1.0, size=(n, d))


def test_same_distribution_is_near_zero_and_different_is_clearly_positive():
    a = gaussian(400, 16, 0.0, 0)
    same_mean, same_std = kid(
        torch.from_numpy(a[:200]), torch.from_numpy(a[200:]), subset_size=100, num_subsets=50
    )
    b = gaussian(200, 16, 0.5, 1)
    diff_mean, diff_std = kid(a[:200], b, subset_size=100, num_subsets=50)
    assert abs(same_mean) < 3 * same_std + 1e-3
    assert diff_mean > 5 * diff_std and diff_mean > 20 * abs(same_mean)


def test_equals_a_straightforward_implementation():
    a = gaussian(23, 6, 0.0, 2)
    b = gaussian(17, 6, 0.3, 3)
    m, k = 9, 7
    got = kid(a, b, subset_size=m, num_subsets=k, seed=5)
    want = kid_by_loops(a, b, m, subset_indices(len(a), len(b), m, k, 5))
    assert got[0] == pytest.approx(want[0], abs=1e-6)
    assert got[1] == pytest.approx(want[1], abs=1e-6)


def test_both_code_paths_agree(monkeypatch):
    a = gaussian(60, 8, 0.0, 4).astype(np.float32)
    b = gaussian(50, 8, 0.2, 5).astype(np.float32)
    fast = kid(a, b, subset_size=30, num_subsets=20, seed=1)
    monkeypatch.setattr(kid_module, "_GRAM_BUDGET", 0)  # force the per-subset kernels
    slow = kid(a, b, subset_size=30, num_subsets=20, seed=1)
    assert fast == pytest.approx(slow, abs=1e-12)


def test_subset_is_capped_at_the_smaller_set_of_twenty():
    a = gaussian(20, 5, 0.0, 6)
    b = gaussian(35, 5, 1.0, 7)
    mean, std = kid(a, b, subset_size=1000, num_subsets=10, seed=0)
    want = kid_by_loops(a, b, 20, subset_indices(20, 35, 20, 10, 0))
    assert mean == pytest.approx(want[0], abs=1e-6) and std == pytest.approx(want[1], abs=1e-6)
    assert mean > 0
    # with both sets fully used every subset is the same sample: no spread
    _, std_full = kid(a, a[::-1].copy(), subset_size=50, num_subsets=5)
    assert std_full == pytest.approx(0.0, abs=1e-12)


def test_seed_makes_it_reproducible():
    a, b = gaussian(40, 4, 0, 8), gaussian(40, 4, 0.2, 9)
    assert kid(a, b, 10, 10, seed=3) == kid(a, b, 10, 10, seed=3)
    assert kid(a, b, 10, 10, seed=3) != kid(a, b, 10, 10, seed=4)


@pytest.mark.parametrize(
    ("a", "b", "match"),
    [
        (np.zeros((1, 4)), np.zeros((5, 4)), "feats_a has 1 sample"),
        (np.zeros((5, 4)), np.zeros((0, 4)), "feats_b has 0 sample"),
        (np.zeros((5, 4)), np.zeros((5, 3)), "feature dimensions differ"),
        (np.zeros(5), np.zeros((5, 3)), r"\[N, D\]"),
        (np.full((3, 2), np.nan), np.zeros((5, 2)), "NaN"),
    ],
)
def test_errors(a, b, match):
    with pytest.raises(ValueError, match=match):
        kid(a, b)


def test_equals_torchmetrics_kernel_inception_distance_on_the_same_features():
    """Our estimator and torchmetrics' KernelInceptionDistance (fed the features through an identity
    feature module) agree: same kernel, same unbiased MMD^2, same subsets for the same seed."""
    tm = pytest.importorskip("torchmetrics.image.kid")

    class Features(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    a = torch.from_numpy(gaussian(50, 8, 0.3, 10))  # generated ("fake")
    b = torch.from_numpy(gaussian(80, 8, 0.0, 11))  # targets ("real")
    metric = tm.KernelInceptionDistance(feature=Features(), subset_size=20, subsets=30)
    metric.update(b, real=True)
    metric.update(a, real=False)
    torch.manual_seed(7)
    want_mean, want_std = (float(v) for v in metric.compute())
    got_mean, got_std = kid(a, b, subset_size=20, num_subsets=30, seed=7)
    assert got_mean == pytest.approx(want_mean, rel=1e-12) and got_std == pytest.approx(want_std, rel=1e-12)


def test_subset_for_keeps_the_spread_honest():
    assert subset_for(None, 50, 100) == (25, None)
    assert subset_for(20, 50, 100) == (20, None)
    m, warning = subset_for(20, 20, 100)
    assert m == 10 and warning is not None and "20 >= the smaller set (20 samples)" in warning
    a, b = gaussian(20, 4, 0.0, 12), gaussian(20, 4, 0.5, 13)
    assert kid(a, b, subset_size=m, num_subsets=20)[1] > 1e-3  # a spread, not 1e-15
