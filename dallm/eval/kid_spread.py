"""KID with the spread that fits the question: the std of the mean, and paired differences.

`dallm.eval.kid.kid` reports the std over random subsets: the spread of one KID from a subset of m
samples. That is 2-5x wider than the uncertainty of the KID of all the samples, and blind to the
reference set (issue 23). Here:

- `kid_mean`: the unbiased KID of all samples against all references, with the std of that mean by
  a bootstrap over the reference images and over the generated samples together (each generated
  sample has its own noise seed, so resampling samples resamples the noise), plus each part alone.
- `paired_kid_difference`: KID(A) - KID(B) for two sample sets made with the same prompts and noise
  (row i of A and of B share them) against one reference set; every bootstrap replicate resamples
  the same reference indices and the same sample indices for both, so what the two share cancels.
  "A beats B" is said only when its 95% interval excludes 0.
- `split_references`: two disjoint halves of the reference indices, fixed by a seed: one to choose a
  checkpoint on, the other to report the chosen one's KID (no winner's curse).

The estimator is kid.py's unbiased MMD^2 with the cubic kernel (`polynomial_kernel`). A bootstrap
replicate is the same U-statistic over the resampled multiset, leaving out pairs of one original
sample with itself (a duplicate drawn twice would add k(x, x), large, and bias every replicate up):
with counts c_i, sum_{i != j} c_i c_j k_ij / ((sum c)^2 - sum c_i^2). With all counts 1 it is the
plain estimate. Percentile intervals; all arithmetic float64; no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from dallm.eval.kid import as_features, polynomial_kernel

N_BOOT = 1000  # bootstrap replicates: the std of a std estimate from B replicates is ~ 1/sqrt(2B), 2%
_CHUNK = 256  # replicates per matrix product (memory: _CHUNK x n float64)


@dataclass(frozen=True)
class KidMean:
    """The KID of all samples against all references, and the std of that mean."""

    mean: float
    std: float  # bootstrap over references and samples together: the one to show as "±"
    std_refs: float  # references resampled, samples fixed
    std_samples: float  # samples (noise seeds) resampled, references fixed
    low: float  # 95% percentile interval (both resampled)
    high: float
    n_samples: int
    n_refs: int
    n_boot: int


@dataclass(frozen=True)
class PairedKid:
    """KID(A) - KID(B) on shared references and shared noise, with its bootstrap spread."""

    diff: float
    std: float
    low: float  # percentile interval at `level`
    high: float
    level: float
    n_boot: int

    @property
    def excludes_zero(self) -> bool:
        """The interval lies wholly on one side of 0: A and B differ reliably."""
        return self.low > 0 or self.high < 0


def _counts(n: int, n_boot: int, gen: torch.Generator | None) -> Tensor:
    """[n_boot, n] multinomial counts of a bootstrap resample of n items; all ones without `gen`."""
    if gen is None:
        return torch.ones(n_boot, n, dtype=torch.float64)
    idx = torch.randint(n, (n_boot, n), generator=gen)
    return torch.zeros(n_boot, n, dtype=torch.float64).scatter_add_(
        1, idx, torch.ones(n_boot, n, dtype=torch.float64)
    )


def _within(k: Tensor, c: Tensor) -> Tensor:
    """Weighted mean of k_ij over pairs of distinct originals, per row of counts c [B, n]."""
    pairs = ((c @ k) * c).sum(1) - (c * c * k.diagonal()).sum(1)
    norm = c.sum(1) ** 2 - (c * c).sum(1)
    # A resample of one distinct item has no pair: NaN, left out of the spread (only for tiny n).
    return torch.where(norm > 0, pairs / norm.clamp(min=1), torch.full_like(pairs, float("nan")))


def _cross(k: Tensor, cx: Tensor, cy: Tensor) -> Tensor:
    return ((cx @ k) * cy).sum(1) / (cx.sum(1) * cy.sum(1))


def _replicates(kxx: Tensor, kyy: Tensor, kxy: Tensor, cx: Tensor, cy: Tensor) -> Tensor:
    out = []
    for s in range(0, len(cx), _CHUNK):
        x, y = cx[s : s + _CHUNK], cy[s : s + _CHUNK]
        out.append(_within(kxx, x) + _within(kyy, y) - 2 * _cross(kxy, x, y))
    return torch.cat(out)


def _interval(values: np.ndarray, level: float) -> tuple[float, float, float]:
    v = values[np.isfinite(values)]
    lo, hi = np.quantile(v, [(1 - level) / 2, (1 + level) / 2])
    return float(v.std(ddof=1)), float(lo), float(hi)


def _check(n_boot: int, level: float) -> None:
    if n_boot < 2:
        raise ValueError(f"KID bootstrap: n_boot must be >= 2, got {n_boot}")
    if not 0 < level < 1:
        raise ValueError(f"KID bootstrap: level must be in (0, 1), got {level}")


def kid_mean(
    samples: Tensor | np.ndarray,
    refs: Tensor | np.ndarray,
    n_boot: int = N_BOOT,
    seed: int = 0,
    level: float = 0.95,
) -> KidMean:
    """KID of `samples` [N, D] against `refs` [R, D] with the std of the mean (see the module docstring)."""
    _check(n_boot, level)
    x, y = as_features(samples, "samples"), as_features(refs, "refs")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"KID: feature dimensions differ ({x.shape[1]} vs {y.shape[1]})")
    kxx, kyy, kxy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    nx, ny = len(x), len(y)
    mean = float(_replicates(kxx, kyy, kxy, _counts(nx, 1, None), _counts(ny, 1, None))[0])
    gen = torch.Generator().manual_seed(seed)
    cx, cy = _counts(nx, n_boot, gen), _counts(ny, n_boot, gen)
    both = _replicates(kxx, kyy, kxy, cx, cy).numpy()
    refs_only = _replicates(kxx, kyy, kxy, _counts(nx, n_boot, None), cy).numpy()
    samples_only = _replicates(kxx, kyy, kxy, cx, _counts(ny, n_boot, None)).numpy()
    std, low, high = _interval(both, level)
    return KidMean(
        mean,
        std,
        _interval(refs_only, level)[0],
        _interval(samples_only, level)[0],
        low,
        high,
        nx,
        ny,
        n_boot,
    )


def paired_kid_difference(
    samples_a: Tensor | np.ndarray,
    samples_b: Tensor | np.ndarray,
    refs: Tensor | np.ndarray,
    n_boot: int = N_BOOT,
    seed: int = 0,
    level: float = 0.95,
) -> PairedKid:
    """KID(A, refs) - KID(B, refs), row i of A and B made with the same prompt and noise."""
    _check(n_boot, level)
    a, b, y = (
        as_features(samples_a, "samples_a"),
        as_features(samples_b, "samples_b"),
        as_features(refs, "refs"),
    )
    if a.shape != b.shape:
        raise ValueError(
            f"paired KID: A and B must be paired row by row (same prompts and noise), got {tuple(a.shape)} "
            f"and {tuple(b.shape)}"
        )
    if a.shape[1] != y.shape[1]:
        raise ValueError(f"KID: feature dimensions differ ({a.shape[1]} vs {y.shape[1]})")
    kaa, kbb = polynomial_kernel(a, a), polynomial_kernel(b, b)
    kay, kby = polynomial_kernel(a, y), polynomial_kernel(b, y)
    n, r = len(a), len(y)

    def diff(cx: Tensor, cy: Tensor) -> Tensor:
        # The reference-reference term is the same for A and B: left out, it cancels exactly.
        out = []
        for s in range(0, len(cx), _CHUNK):
            x, z = cx[s : s + _CHUNK], cy[s : s + _CHUNK]
            out.append(_within(kaa, x) - _within(kbb, x) - 2 * (_cross(kay, x, z) - _cross(kby, x, z)))
        return torch.cat(out)

    point = float(diff(_counts(n, 1, None), _counts(r, 1, None))[0])
    gen = torch.Generator().manual_seed(seed)
    reps = diff(_counts(n, n_boot, gen), _counts(r, n_boot, gen)).numpy()
    std, low, high = _interval(reps, level)
    return PairedKid(point, std, low, high, level, n_boot)


def split_references(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two disjoint halves of range(n), sorted, the same for the same (n, seed): (choose, report).

    Choose a checkpoint on the KIDs against the first half, report its KID against the second: the
    reported figure is then not the minimum of noisy values (the winner's curse). An odd n gives
    the extra index to the choosing half.
    """
    if n < 4:
        raise ValueError(f"split_references: {n} references; at least 4 (2 per half) are needed")
    perm = np.random.default_rng(seed).permutation(n)
    half = (n + 1) // 2
    return np.sort(perm[:half]), np.sort(perm[half:])


__all__ = ["N_BOOT", "KidMean", "PairedKid", "kid_mean", "paired_kid_difference", "split_references"]
