"""From what an evaluation measured to what `dallm.monitor.selection.select_checkpoint` takes.

`checkpoint_evidence` turns per-checkpoint sample features (the same prompts and noise at every
checkpoint, row i of each), one reference set, and the validation losses and fidelities measured at
the same steps into `Evidence` records and a `paired(a, b)` function: the references are split once
(`split_references`), KIDs and their std of the mean are taken on the choosing half, the reported KID
on the other half, and paired differences on the choosing half, computed when asked and kept.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
from torch import Tensor

from dallm.eval.kid_spread import N_BOOT, kid_mean, paired_kid_difference, split_references
from dallm.monitor.selection import Evidence, EvidenceSet, Interval


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


def job_evidence(
    out_dir: Path,
    history: Mapping[int, Mapping[str, float]],
    steps: Sequence[int],
    n_boot: int = N_BOOT,
    seed: int = 0,
) -> EvidenceSet | None:
    """The evidence of a job's evaluated `steps`: the sample features and validation references its
    evaluations kept (`dallm.eval.signals`: eval/evidence/), val_loss / fidelity of `history` (step ->
    the measures of that evaluation; steps missing there are read from metrics.jsonl, as after a resume),
    base_fidelity from any of them. None: nothing was measured."""
    from safetensors.torch import load_file

    from dallm.eval.signals import EVIDENCE_DIR, REFS_FILE, evidence_file

    missing = [s for s in steps if s not in history]
    if missing:  # evaluated before a resume: the figures are in metrics.jsonl
        from dallm.protocol.files import METRICS_FILE, MetricsFileError, read_metrics

        try:
            logged = {int(r["step"]): r for r in read_metrics(out_dir / METRICS_FILE)}
        except (OSError, MetricsFileError):
            logged = {}
        history = {**{s: logged[s] for s in missing if s in logged and "kid_val" in logged[s]}, **history}
    rows = {s: history[s] for s in steps if s in history}
    if not rows:
        return None
    val_loss = {s: v["val_loss"] for s, v in rows.items() if "val_loss" in v}
    fidelity = {s: v["fidelity"] for s, v in rows.items() if "fidelity" in v}
    base = next((v["base_fidelity"] for v in rows.values() if "base_fidelity" in v), None)
    refs_path = out_dir / EVIDENCE_DIR / REFS_FILE
    samples = {}
    for s in rows:
        path = evidence_file(out_dir, s)
        if path.is_file():
            samples[s] = load_file(str(path))["features"]
    refs = load_file(str(refs_path))["features"] if refs_path.is_file() else None
    if (
        refs is not None
        and samples
        and len(refs) >= 4
        and len({tuple(x.shape) for x in samples.values()}) == 1
    ):
        records, paired = checkpoint_evidence(samples, refs, val_loss, fidelity, n_boot, seed)
    else:  # no features kept (or too few references to split): the figures of each evaluation, unpaired
        samples, paired = {}, None
        records = [
            Evidence(s, kid=v.get("kid_val"), kid_std=v.get("kid_val_std"), val_loss=val_loss.get(s),
                     fidelity=fidelity.get(s))
            for s, v in rows.items()
        ]  # fmt: skip
    records += [
        Evidence(s, val_loss=val_loss.get(s), fidelity=fidelity.get(s))
        for s in rows
        if s not in samples and paired is not None
    ]
    return EvidenceSet(records, paired, base)


__all__ = ["checkpoint_evidence", "job_evidence"]
