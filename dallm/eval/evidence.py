"""From what an evaluation measured to what `dallm.monitor.selection.select_checkpoint` takes.

`checkpoint_evidence` turns per-checkpoint sample features (the same prompts and noise at every
checkpoint, row i of each), one reference set, and the validation losses and fidelities measured at
the same steps into `Evidence` records and a `paired(a, b)` function: the references are split once
(`split_references`), KIDs and their std of the mean are taken on the choosing half, the reported KID
on the other half, and paired differences on the choosing half, computed when asked and kept.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
from torch import Tensor

from dallm.eval.kid_spread import N_BOOT, kid_mean, paired_kid_difference, split_references
from dallm.monitor.selection import Evidence, Interval


def checkpoint_evidence(
    samples: Mapping[int, Tensor | np.ndarray],
    refs: Tensor | np.ndarray,
    val_loss: Mapping[int, float] | None = None,
    fidelity: Mapping[int, float] | None = None,
    n_boot: int = N_BOOT,
    seed: int = 0,
) -> tuple[list[Evidence], Callable[[int, int], Interval]]:
    """`Evidence` per step of `samples` (features [N, D] per checkpoint), and paired differences."""
    choose, report = split_references(len(refs), seed)
    ref_choose, ref_report = refs[choose], refs[report]
    records = []
    for step, x in sorted(samples.items()):
        m = kid_mean(x, ref_choose, n_boot, seed)
        reported = kid_mean(x, ref_report, 2, seed).mean  # the estimate only: no spread needed
        records.append(
            Evidence(
                step,
                kid=m.mean,
                kid_std=m.std,
                kid_report=reported,
                val_loss=(val_loss or {}).get(step),
                fidelity=(fidelity or {}).get(step),
            )
        )
    known: dict[tuple[int, int], Interval] = {}

    def paired(a: int, b: int) -> Interval:
        if (a, b) not in known:
            p = paired_kid_difference(samples[a], samples[b], ref_choose, n_boot, seed)
            known[(a, b)] = (p.diff, p.low, p.high)
        return known[(a, b)]

    return records, paired


__all__ = ["checkpoint_evidence"]
