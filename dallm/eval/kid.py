"""Kernel Inception Distance (Binkowski et al., 2018) over precomputed features.

KID = the unbiased estimator of MMD^2 with the cubic polynomial kernel k(x, y) = (x.y / d + 1)^3,
averaged over `num_subsets` random subsets of `m` rows drawn without replacement from each set:

    MMD^2_u = sum_{i != j} k(x_i, x_j) / (m (m-1)) + sum_{i != j} k(y_i, y_j) / (m (m-1))
              - 2 sum_{i, j} k(x_i, y_j) / m^2

m = min(subset_size, len(a), len(b)). The result is (mean, std) over subsets, std being the
population standard deviation, as torch-fidelity and torchmetrics report it. The subsets are drawn
exactly as torchmetrics' `KernelInceptionDistance` draws them (torch.randperm of b, then of a, per
subset, from a generator seeded with `seed`), so with a = its fake and b its real features and
`torch.manual_seed(seed)` the two agree to rounding (tests/test_kid.py). Ours stays because it
computes the kernel matrices once and gathers the subsets from them (100 subsets of 50 cost one
kernel evaluation, not 100), in float64.

The spread is that of a KID from m samples: it means something only when m is smaller than both
sets; with m equal to both every subset is the whole set and the std is 0 (`subset_for` picks an
honest m and says when it had to lower one). All arithmetic is float64. The unbiased estimate can be
slightly negative for close distributions.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

if TYPE_CHECKING:
    from dallm.config import EvalConfig

# Precompute the full kernel matrices when they are at most this many entries in all (8 bytes each).
_GRAM_BUDGET = 3 * 4096 * 4096


def subset_indices(
    n_a: int, n_b: int, m: int, num_subsets: int, seed: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """The random subsets used by `kid`: for each, m row indices into a and m into b (no repeats),
    drawn in torchmetrics' order (b first) from a torch generator seeded with `seed`."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(num_subsets):
        ib = torch.randperm(n_b, generator=gen)[:m].numpy()
        ia = torch.randperm(n_a, generator=gen)[:m].numpy()
        out.append((ia, ib))
    return out


def subset_for(requested: int | None, n_a: int, n_b: int) -> tuple[int, str | None]:
    """An honest subset size for sets of n_a and n_b samples, and a warning when it had to change.

    `requested` None: half of the smaller set. A request >= the smaller set would make every
    subset (of that set) the whole set and understate the spread: it is lowered to half of it.
    """
    n = min(n_a, n_b)
    half = max(2, n // 2)
    if requested is None:
        return half, None
    if requested >= n:
        return half, (
            f"KID subset size {requested} >= the smaller set ({n} samples): every subset would be the "
            f"whole set and the spread 0; using {half}"
        )
    return requested, None


def as_features(x: Tensor | np.ndarray, name: str) -> Tensor:
    """A float64 CPU [N, D] matrix of at least 2 finite rows; ValueError naming `name` otherwise."""
    t = torch.as_tensor(x).detach().to("cpu", torch.float64)
    if t.ndim != 2:
        raise ValueError(f"KID: {name} must be a [N, D] feature matrix, got shape {tuple(t.shape)}")
    if len(t) < 2:
        raise ValueError(f"KID: {name} has {len(t)} sample(s); at least 2 are needed")
    if not torch.isfinite(t).all():
        raise ValueError(f"KID: {name} contains NaN or infinite features")
    return t


def polynomial_kernel(x: Tensor, y: Tensor) -> Tensor:
    """KID's kernel matrix k(x_i, y_j) = (x_i . y_j / d + 1)^3 (d the feature dimension)."""
    return (x @ y.T / x.shape[1] + 1) ** 3


def _mmd2(kxx: Tensor, kyy: Tensor, kxy: Tensor) -> float:
    m = kxx.shape[0]
    sxx = kxx.sum() - kxx.diagonal().sum()
    syy = kyy.sum() - kyy.diagonal().sum()
    return float(sxx / (m * (m - 1)) + syy / (m * (m - 1)) - 2 * kxy.sum() / (m * m))


def kid(
    feats_a: Tensor | np.ndarray,
    feats_b: Tensor | np.ndarray,
    subset_size: int = 1000,
    num_subsets: int = 100,
    seed: int = 0,
) -> tuple[float, float]:
    """KID between two feature sets [N_a, D] and [N_b, D]: (mean, std) over random subsets."""
    a = as_features(feats_a, "feats_a")
    b = as_features(feats_b, "feats_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"KID: feature dimensions differ ({a.shape[1]} vs {b.shape[1]})")
    if subset_size < 2:
        raise ValueError(f"KID: subset_size must be >= 2, got {subset_size}")
    if num_subsets < 1:
        raise ValueError(f"KID: num_subsets must be >= 1, got {num_subsets}")
    m = min(subset_size, len(a), len(b))
    subsets = subset_indices(len(a), len(b), m, num_subsets, seed)
    kernel = polynomial_kernel
    values = []
    na, nb = len(a), len(b)
    if na * na + nb * nb + na * nb <= _GRAM_BUDGET:
        # Small sets (the usual case: tens to a few thousand images): kernel matrices once, then gathers.
        kaa, kbb, kab = kernel(a, a), kernel(b, b), kernel(a, b)
        for ia, ib in subsets:
            ta, tb = torch.from_numpy(ia), torch.from_numpy(ib)
            values.append(_mmd2(kaa[ta][:, ta], kbb[tb][:, tb], kab[ta][:, tb]))
    else:
        for ia, ib in subsets:
            x, y = a[torch.from_numpy(ia)], b[torch.from_numpy(ib)]
            values.append(_mmd2(kernel(x, x), kernel(y, y), kernel(x, y)))
    arr = np.asarray(values)
    return float(arr.mean()), float(arr.std())


# How the spread of a KID from m samples per side falls with m. The unbiased MMD^2 is a two-sample
# U-statistic: Var = 4 zeta_1 / m + O(1 / m^2), so std ~ m^-1/2 whenever the two distributions differ
# (zeta_1 > 0: a job's samples vs its targets), and std ~ m^-1 only when they are equal (zeta_1 = 0).
# 1/2 is the slower of the two: counts chosen with it meet the target in both cases
# (tests/test_kid_precision.py fits the exponent on Gaussian features: 0.5 and 1 respectively).
STD_EXPONENT = 0.5

_LIMITS = ("target", "max_images", "reference")  # what decided a SampleCount (its `limit`)


@dataclass(frozen=True)
class SampleCount:
    """The eval sample count chosen for a KID precision target, and why (`describe`)."""

    num_images: int  # samples per evaluation from now on
    subset_size: int  # KID subset size (the same fraction of the samples as configured)
    target: float  # eval.kid_std_target
    measured_std: float  # the KID std measured at the configured count ...
    measured_images: int  # ... of this many samples
    measured_subset: int  # ... with subsets of this size
    predicted_std: float  # the std expected with `subset_size` (STD_EXPONENT)
    limit: (
        str  # target: met; max_images: capped by eval.max_images; reference: the reference set is too small
    )
    reference: str  # the key of the reference set the target applies to (eval.val_dir / data.dir)
    reference_size: int  # its number of images
    needed_subset: int  # the subset size the target needs (more than `subset_size` unless met)

    def values(self) -> dict[str, float]:
        """As metric values (eval/summary.json and metrics rows carry floats only)."""
        d = asdict(self)
        d["limit"] = float(_LIMITS.index(self.limit))
        d.pop("reference")
        return {f"eval_samples_{k}": float(v) for k, v in d.items()}

    @classmethod
    def from_values(cls, values: dict[str, float], reference: str) -> SampleCount | None:
        """The inverse of `values` (None when they hold no choice)."""
        if "eval_samples_num_images" not in values:
            return None
        d: dict = {
            k.removeprefix("eval_samples_"): v for k, v in values.items() if k.startswith("eval_samples_")
        }
        d["limit"] = _LIMITS[int(d["limit"])]
        ints = (
            "num_images",
            "subset_size",
            "measured_images",
            "measured_subset",
            "reference_size",
            "needed_subset",
        )
        return cls(reference=reference, **{k: (int(v) if k in ints else v) for k, v in d.items()})

    def describe(self) -> str:
        """One line: the count, the figures it came from, and what limited it."""
        got = (
            f"KID samples: {self.num_images} (subsets of {self.subset_size}) for eval.kid_std_target "
            f"{self.target:.3g}: std {self.measured_std:.3g} measured with {self.measured_images} samples "
            f"(subsets of {self.measured_subset}), ~{self.predicted_std:.3g} expected"
        )
        if self.limit == "max_images":
            return f"{got}; capped by eval.max_images (the target needs subsets of {self.needed_subset})"
        if self.limit == "reference":
            return (
                f"{got}; eval.kid_std_target cannot be met: {self.reference} has {self.reference_size} images "
                f"and KID subsets stay at most half of them; the target needs subsets of {self.needed_subset}, "
                f"about {2 * self.needed_subset} reference images"
            )
        return got


def choose_sample_count(
    measured_std: float,
    num_images: int,
    subset_size: int,
    target: float,
    max_images: int,
    reference: str,
    reference_size: int,
    exponent: float = STD_EXPONENT,
) -> SampleCount:
    """The number of eval samples whose KID std is `target`, from the std measured with
    `num_images` samples and subsets of `subset_size` (std ~ subset^-exponent).

    The subset keeps its fraction of the samples (so it stays below the count), is at most half of
    the reference set (subsets of the references must vary for the spread to include their share),
    and the count at most `max_images`; the count may also fall below `num_images` when the target
    is looser than what was measured. `limit` says which bound decided.
    """
    frac = subset_size / num_images
    if measured_std <= 0:  # identical features (a degenerate test): nothing to gain from more samples
        needed = subset_size
    else:
        needed = math.ceil(subset_size * (measured_std / target) ** (1 / exponent) - 1e-9)
    needed = max(2, needed)
    m, limit = needed, "target"
    ref_cap = max(2, reference_size // 2)
    if m > ref_cap:
        m, limit = ref_cap, "reference"
    max_cap = max(2, math.floor(max_images * frac))
    if m > max_cap:
        m, limit = max_cap, "max_images"
    n = min(max(math.ceil(m / frac - 1e-9), m + 1), max(max_images, m + 1))
    predicted = measured_std * (subset_size / m) ** exponent
    return SampleCount(
        n,
        m,
        target,
        measured_std,
        num_images,
        subset_size,
        predicted,
        limit,
        reference,
        reference_size,
        needed,
    )


def count_for_target(ev: EvalConfig, refs: dict[str, Tensor], seed: int) -> SampleCount:
    """The sample count for eval.kid_std_target, from the KID std of the base model's images
    (already made with eval.num_images) to the validation targets (else the training targets)."""
    name, key = ("val", "eval.val_dir") if "val" in refs else ("train", "data.dir")
    base, ref = refs["base"], refs[name]
    subset, _ = subset_for(ev.subset_size, len(base), len(ref))
    _, std = kid(base, ref, subset_size=subset, num_subsets=ev.num_subsets, seed=seed)
    assert ev.kid_std_target is not None
    return choose_sample_count(
        std, len(base), subset, ev.kid_std_target, max(ev.max_images, ev.num_images), key, len(ref)
    )


__all__ = [
    "count_for_target",
    "STD_EXPONENT",
    "SampleCount",
    "as_features",
    "choose_sample_count",
    "kid",
    "polynomial_kernel",
    "subset_for",
    "subset_indices",
]
