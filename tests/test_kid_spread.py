"""KID's std of the mean and paired differences (dallm.eval.kid_spread) on Gaussian features."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dallm.eval.kid import kid, polynomial_kernel
from dallm.eval.kid_spread import _counts, _replicates, kid_mean, paired_kid_difference, split_references


def gaussian(n: int, d: int, shift: float, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(shift, 1.0, size=(n, d))


def test_the_mean_is_kids_unbiased_estimate_on_all_samples():
    a, b = gaussian(30, 5, 0.0, 0), gaussian(30, 5, 0.4, 1)
    # one subset of all 30 rows of each set is the whole-set estimate
    want, _ = kid(a, b, subset_size=30, num_subsets=1)
    assert kid_mean(a, b, n_boot=10).mean == pytest.approx(want, abs=1e-12)


def test_a_replicate_leaves_out_pairs_of_one_original_with_itself():
    x, y = gaussian(6, 3, 0.0, 2), gaussian(5, 3, 0.5, 3)
    ix, iy = [0, 0, 1, 3, 3, 3], [4, 4, 2, 0, 1]  # a resample with duplicates

    def k(u, v) -> float:
        return (float(np.dot(u, v)) / 3 + 1) ** 3

    def within(rows, idx) -> float:
        pairs = [(i, j) for i in range(len(idx)) for j in range(len(idx)) if idx[i] != idx[j]]
        return sum(k(rows[idx[i]], rows[idx[j]]) for i, j in pairs) / len(pairs)

    cross = sum(k(x[i], y[j]) for i in ix for j in iy) / (len(ix) * len(iy))
    want = within(x, ix) + within(y, iy) - 2 * cross
    tx, ty = torch.from_numpy(x), torch.from_numpy(y)
    cx = torch.bincount(torch.tensor(ix), minlength=6).double()[None]
    cy = torch.bincount(torch.tensor(iy), minlength=5).double()[None]
    kk = polynomial_kernel
    got = _replicates(kk(tx, tx), kk(ty, ty), kk(tx, ty), cx, cy)
    assert float(got[0]) == pytest.approx(want, rel=1e-12)
    assert _counts(7, 3, torch.Generator().manual_seed(0)).sum(1).tolist() == [7.0] * 3


def test_identical_sets_differ_by_exactly_zero_with_zero_spread():
    a, refs = gaussian(40, 8, 0.3, 4), gaussian(50, 8, 0.0, 5)
    p = paired_kid_difference(a, a.copy(), refs, n_boot=200)
    assert (p.diff, p.std, p.low, p.high) == (0.0, 0.0, 0.0, 0.0)
    assert not p.excludes_zero


def test_a_shifted_set_is_reliably_worse():
    refs = gaussian(100, 8, 0.0, 6)
    noise = gaussian(100, 8, 0.0, 7)  # shared noise: B is A moved further from the references
    p = paired_kid_difference(noise + 0.6, noise + 0.1, refs, n_boot=400)
    assert p.diff > 0 and p.low > 0 and p.excludes_zero
    assert p.low <= p.diff <= p.high and p.std > 0
    # the sign flips with the order, and so does the interval
    q = paired_kid_difference(noise + 0.1, noise + 0.6, refs, n_boot=400)
    assert q.diff == pytest.approx(-p.diff) and q.high < 0


def test_pairing_makes_the_difference_tighter_than_two_separate_spreads():
    refs = gaussian(80, 8, 0.0, 8)
    noise = gaussian(80, 8, 0.0, 9)
    a, b = noise + 0.30, noise + 0.35
    p = paired_kid_difference(a, b, refs, n_boot=400)
    sa, sb = kid_mean(a, refs, n_boot=400), kid_mean(b, refs, n_boot=400)
    assert p.std < 0.5 * np.hypot(sa.std, sb.std)


def test_the_std_of_the_mean_shrinks_as_one_over_root_n():
    def std(n: int) -> float:
        return kid_mean(gaussian(n, 8, 0.4, 10), gaussian(n, 8, 0.0, 11), n_boot=400, seed=1).std

    ratio = std(100) / std(400)  # 4x the samples and references: about half the std
    assert 1.5 < ratio < 2.7, ratio


def test_the_std_of_the_mean_is_below_the_std_over_subsets_and_has_both_parts():
    a, refs = gaussian(100, 8, 0.4, 12), gaussian(100, 8, 0.0, 13)
    m = kid_mean(a, refs, n_boot=400)
    _, subset_std = kid(a, refs, subset_size=25, num_subsets=100)
    assert m.std < subset_std
    assert 0 < m.std_refs < m.std and 0 < m.std_samples < m.std
    assert m.low < m.mean < m.high and (m.n_samples, m.n_refs, m.n_boot) == (100, 100, 400)
    assert kid_mean(a, refs, n_boot=50, seed=3) == kid_mean(a, refs, n_boot=50, seed=3)


def test_split_references_is_fixed_disjoint_and_whole():
    choose, report = split_references(11, seed=2)
    assert len(choose) == 6 and len(report) == 5
    assert sorted(np.concatenate([choose, report]).tolist()) == list(range(11))
    again = split_references(11, seed=2)
    assert (again[0] == choose).all() and (again[1] == report).all()
    assert not (split_references(11, seed=3)[0] == choose).all()
    with pytest.raises(ValueError, match="at least 4"):
        split_references(3)


def test_errors_say_what_is_wrong():
    a = gaussian(10, 4, 0.0, 0)
    with pytest.raises(ValueError, match="paired row by row"):
        paired_kid_difference(a, a[:9], a)
    with pytest.raises(ValueError, match="feature dimensions"):
        kid_mean(a, gaussian(10, 5, 0.0, 1))
    with pytest.raises(ValueError, match="n_boot"):
        kid_mean(a, a, n_boot=1)
