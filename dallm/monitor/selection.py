"""Which checkpoint is best, on the evidence: validation KID, guarded by prompt fidelity, judged on
paired differences, reported on references it was not chosen on. Pure: records in, a choice out.

"Best" (issue 23; docs/evaluation.md) is what a user would pick: close to the target distribution
(the validation KID) *and* still drawing what the prompt asks for (prompt fidelity on held-out
prompts). The rule, `select_checkpoint`:

1. Fidelity guard: a checkpoint is eligible when its fidelity is at least the base model's minus
   `fidelity_margin` (monitor.fidelity_margin). With no fidelity measured (no base figure, or no
   record carrying one) the guard is off and says so in the signal; when it is on, a record without
   a fidelity figure cannot show that it keeps the prompt and is not eligible.
2. Among the eligible, the lowest validation KID is chosen. (An earlier rule, "the earliest
   checkpoint not reliably worse than the lowest", returned step 30 or 60 in almost every run of the
   out-of-sample experiment, 1 of 10 tune runs within one paired SE of the best on fresh references:
   docs/results.md section 3; it was dropped.) The paired differences come from the caller (`paired(a, b) -> (diff, low, high)`, e.g.
   `dallm.eval.kid_spread.paired_kid_difference` on shared references and noise); without them an
   unpaired interval from the two stds of the mean stands in (wider: it cannot cancel what the two
   share), and the result says it was unpaired.
3. Winner's curse: choose on the KIDs against one half of the references (`Evidence.kid`) and report
   the chosen one's KID against the other half (`Evidence.kid_report`;
   `dallm.eval.kid_spread.split_references` makes the halves). The minimum of noisy values is biased
   low; a figure on references that played no part in the choice is not.
4. The margin to the runner-up (the eligible checkpoint with the next lowest KID) is reported as a
   paired difference: KID(chosen) - KID(runner-up) with its interval.

Fallbacks, each named in `Selection.signal`: no KID -> the lowest validation loss (with the guard);
no eligible checkpoint -> the highest fidelity; no KID and no loss -> the turning point; else the last.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

Interval = tuple[float, float, float]  # (difference, low, high): KID(a) - KID(b) and its 95% interval
Z95 = 1.959964  # the normal quantile of an unpaired 95% interval


@dataclass(frozen=True)
class Evidence:
    """What was measured at one checkpoint (None: not measured there)."""

    step: int
    kid: float | None = None  # validation KID against the choosing half of the references
    kid_std: float | None = None  # its std of the mean (bootstrap)
    kid_report: float | None = None  # validation KID against the reporting half
    val_loss: float | None = None  # the repeatable validation loss (dallm.eval.val_loss) or ppl_val
    fidelity: float | None = None  # prompt fidelity on held-out prompts (dallm.eval.fidelity)


@dataclass(frozen=True)
class Selection:
    step: int
    signal: str  # which evidence chose it (module docstring)
    reported_kid: float | None  # the chosen one's KID on the reporting half (else on the choosing half)
    reported_on_held_out_half: bool  # whether `reported_kid` is free of the winner's curse
    runner_up: int | None
    margin: Interval | None  # KID(chosen) - KID(runner-up) and its 95% interval
    paired: bool  # margins from paired differences (else unpaired, from the stds)
    eligible: tuple[int, ...]  # steps that passed the fidelity guard
    excluded: tuple[int, ...]  # steps the guard left out

    def describe(self) -> str:
        """One line: the step, the signal, and the margin to the runner-up."""
        text = f"step {self.step} by {self.signal}"
        if self.reported_kid is not None:
            half = "held-out half of the references" if self.reported_on_held_out_half else "all references"
            text += f"; KID {self.reported_kid:.4g} ({half})"
        if self.margin is not None and self.runner_up is not None:
            d, lo, hi = self.margin
            kind = "paired" if self.paired else "unpaired"
            text += f"; {d:+.4g} [{lo:+.4g}, {hi:+.4g}] ({kind} 95%) against step {self.runner_up}"
        return text


@dataclass(frozen=True)
class EvidenceSet:
    """What a job's evaluator measured, for `select_checkpoint`: records, paired differences (None:
    unpaired from the stds) and the base model's prompt fidelity (None: no guard)."""

    records: list[Evidence]
    paired: Callable[[int, int], Interval] | None
    base_fidelity: float | None


def _unpaired(a: Evidence, b: Evidence) -> Interval:
    d = (a.kid or 0.0) - (b.kid or 0.0)
    half = Z95 * math.hypot(a.kid_std or 0.0, b.kid_std or 0.0)
    return d, d - half, d + half


def select_checkpoint(
    records: Sequence[Evidence],
    base_fidelity: float | None = None,
    fidelity_margin: float = 0.4,
    paired: Callable[[int, int], Interval] | None = None,
    turning_point: int | None = None,
) -> Selection:
    """The checkpoint to return, from `records` (any order, one per step); see the module docstring."""
    if not records:
        raise ValueError("select_checkpoint: no checkpoints")
    if fidelity_margin < 0:
        raise ValueError(f"monitor.fidelity_margin: {fidelity_margin}; at least 0")
    recs = sorted(records, key=lambda r: r.step)
    if len({r.step for r in recs}) != len(recs):
        raise ValueError("select_checkpoint: two records for one step")
    guard = base_fidelity is not None and any(r.fidelity is not None for r in recs)
    floor = (base_fidelity or 0.0) - fidelity_margin

    def passes(r: Evidence) -> bool:
        return not guard or (r.fidelity is not None and r.fidelity >= floor)

    suffix = " with fidelity guard" if guard else ""
    for measure, name in ((lambda r: r.kid, "val KID"), (lambda r: r.val_loss, "val loss")):
        measured = [r for r in recs if measure(r) is not None]
        if not measured:
            continue
        eligible = [r for r in measured if passes(r)]
        excluded = tuple(r.step for r in measured if not passes(r))
        if not eligible:
            return _by_fidelity(measured, excluded)
        if name == "val KID":
            return _by_kid(eligible, excluded, paired, name + suffix)
        best = min(eligible, key=lambda r: (r.val_loss, r.step))
        return Selection(
            best.step,
            name + suffix,
            None,
            False,
            None,
            None,
            False,
            tuple(r.step for r in eligible),
            excluded,
        )
    if turning_point is not None:
        return Selection(turning_point, "turning point", None, False, None, None, False, (), ())
    return Selection(recs[-1].step, "last", None, False, None, None, False, (), ())


def _by_fidelity(measured: list[Evidence], excluded: tuple[int, ...]) -> Selection:
    top = max(measured, key=lambda r: (r.fidelity if r.fidelity is not None else -math.inf, -r.step))
    return Selection(
        top.step, "fidelity (no checkpoint within the margin)", None, False, None, None, False, (), excluded
    )


def _by_kid(
    eligible: list[Evidence],
    excluded: tuple[int, ...],
    paired: Callable[[int, int], Interval] | None,
    signal: str,
) -> Selection:
    by_step = {r.step: r for r in eligible}

    def diff(a: int, b: int) -> Interval:
        return paired(a, b) if paired is not None else _unpaired(by_step[a], by_step[b])

    chosen = min(eligible, key=lambda r: (r.kid, r.step))
    others = [r for r in eligible if r.step != chosen.step]
    runner = min(others, key=lambda r: (r.kid, r.step)) if others else None
    margin = diff(chosen.step, runner.step) if runner is not None else None
    held_out = chosen.kid_report is not None
    return Selection(
        chosen.step,
        signal,
        chosen.kid_report if held_out else chosen.kid,
        held_out,
        runner.step if runner is not None else None,
        margin,
        paired is not None,
        tuple(by_step),
        excluded,
    )


__all__ = ["Evidence", "EvidenceSet", "Interval", "Selection", "select_checkpoint"]
