"""CS-Fluctuation (Eqs. 3-4) and the turning point (Algorithm 1, the second valley).

Source: "early-stopping-lora-cs-fluctuation" (../shared/papers), Section 3.2. Pure functions and one
small class over the CS series (`dallm.monitor.cs` computes CS); no weights, no IO. `dallm.monitor.early_stop` owns
an instance and decides what it means for a run (snapshots, what to return, when to stop).

CS-Fluctuation (Eqs. 3-4), index alignment
    With M the window and the paper's forward windows "sum_{j}^{j+M}" read as the M values j..j+M-1:
        A_j   = mean(CS_j .. CS_{j+M-1})                        (Eq. 3, MA)
        dA_j  = A_j - A_{j-1}                                    (slope, first difference)
        X_j   = mean(dA_j .. dA_{j+M-1})                         (smoothed slope)
        CSF_j = (1/lr_j) * mean_{i=j..j+M-1} (X_i - mean(X_j..X_{j+M-1}))^2      (Eq. 4)
    CSF_j is indexed, as in the paper, at the first step of its windows: it depends on
    CS_{j-1} .. CS_{j+3M-3}, so it becomes known at step j + 3M - 3 (the paper's Algorithm 1 writes
    a lag of M, which counts one window; three nested forward windows of M values lag 3(M-1)).
    `lr_j` is the mean learning rate of steps j .. j+3M-3, the updates whose CS differences the
    variance spans (the paper has one constant lr; under a warm-up or cosine schedule the lr at the
    index step alone would scale a variance shaped by 3M-2 others). CSF_j is None where lr_j <= 0.

The paper's protocol and ours
    The paper computes CS every step and sets M to the steps of one epoch (50 repeats of 20-30
    images) for diffusion models, and to 100 of 1,500 steps for LLMs: M is tied to the data, not to
    the budget. dallm computes CS every step too; `monitor.window` takes steps or epochs
    (`dallm.monitor.window`); a fraction of `train.steps` only as an explicit choice, since the
    turning point falls at about 1-5x M and would then follow whatever budget was typed.

Turning point: two rules (`rule`)
    "paper": Algorithm 1 as written. A valley is a CSF sample after which the first difference of
        CSF turns from negative to positive (a zero difference keeps the previous sign); the turning
        point is the second valley, final as soon as the rise after it is seen.
    "guarded" (the default): a hysteresis ("zig-zag") valley/peak tracker on log10(CSF). A valley is
        the lowest point of a descent that fell more than `min_rise` decades into it and is followed,
        within `horizon` steps, by a rise of more than `min_rise` decades above it; peaks are
        confirmed symmetrically; valleys and peaks alternate. The threshold is on the logarithm
        because CSF spans orders of magnitude (the start-up spike is 67-384x the median): the
        previous guard, a fraction of the range seen so far, was dominated by that spike and found
        no valley at all at windows of 5-10% of a run (docs/results.md). min_rise = 0 does *not*
        make it the paper's rule: merging, the horizon and the wait for finality remain.
        - A valley closer than `min_valley_distance` steps (default: window) to the previous one
          is merged into it (the lower is kept) and not counted; so that a merge can still move it,
          the second valley becomes final only when no closer valley can still be confirmed (at
          the latest `min_valley_distance + horizon` CSF steps after it).
        - A candidate whose rise does not come within `horizon` steps (default 4 * window) is a
          plateau, not a turn: the search restarts after it. This bounds the lag.
        - CSF values <= 0 (CS exactly constant, e.g. a LoRA still frozen) have no logarithm and are
          skipped.
    Either way the turning point is the second valley snapped to the nearest window boundary
    (multiples of `window`, ties to the earlier, never before the first step seen), because the
    trainer keeps weight snapshots at window boundaries; the snap moves it by at most window // 2.
    Lag: the turning point b is returned by `update` at a step t with t - b <= `max_lag`
    (guarded: horizon + min_valley_distance + 3 (window - 1) + window // 2, 8.5 window - 3 with the
    defaults; paper: 3 (window - 1) + 1 + window // 2), so keeping the boundary snapshots of the last
    `max_lag` steps always holds the turning point's weights (`oldest_needed_step`).
    `confirmed_at` is the training step at which it was returned (`seen_at` in result.json).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np

# ----------------------------------------------------------------------------------------------
# CS-Fluctuation (Eqs. 3-4)


def _sliding(x: np.ndarray, m: int, fn: str) -> np.ndarray:
    """Mean or (population) variance of every window of `m` consecutive values, two-pass, in chunks."""
    n = len(x) - m + 1
    if n <= 0:
        return np.empty(0)
    view = np.lib.stride_tricks.sliding_window_view(x, m)
    out = np.empty(n)
    step = max(1, (1 << 21) // m)
    for s in range(0, n, step):
        block = view[s : s + step]
        out[s : s + step] = block.mean(axis=1) if fn == "mean" else block.var(axis=1)
    return out


def _csf_core(cs: np.ndarray, window: int) -> np.ndarray:
    """Variance part of Eq. 4 for every index j = 1..n-3M+2, returned at position j-1."""
    m = window
    ma = _sliding(cs, m, "mean")  # A_i, i = 0..n-M
    slope = np.diff(ma)  # dA_i at position i-1, i = 1..n-M
    x = _sliding(slope, m, "mean")  # X_j at position j-1
    return _sliding(x, m, "var")  # Var(X_j..X_{j+M-1}) at position j-1


def csf_lag(window: int) -> int:
    """Steps between a CS-Fluctuation index j and the step at which CSF_j becomes known: 3(M-1)."""
    return 3 * (window - 1)


def cs_fluctuation(cs: Sequence[float], window: int, lr: float | Sequence[float]) -> list[float | None]:
    """CS-Fluctuation (Eqs. 3-4) of a whole CS series, aligned with it by step index.

    out[j] = CSF_j as in the module docstring: defined for 1 <= j <= len(cs) - 3*window + 2 (and
    lr_j > 0), None elsewhere (index 0 has no slope; the last 3*window - 3 values are not known yet).
    `lr` is one learning rate or one per step (same length as `cs`); lr_j is its mean over the steps
    j .. j + 3*window - 3.
    """
    if window < 2:
        raise ValueError(f"window must be >= 2, got {window}")
    values = np.asarray(cs, dtype=np.float64)
    n = len(values)
    if isinstance(lr, (int, float)):
        lrs = np.full(n, float(lr))
    else:
        lrs = np.asarray(lr, dtype=np.float64)
        if lrs.shape != (n,):
            raise ValueError(f"lr: expected one value or {n} values, got {lrs.shape[0] if lrs.ndim else 1}")
    out: list[float | None] = [None] * n
    var = _csf_core(values, window)
    lr_mean = _sliding(lrs[1:], csf_lag(window) + 1, "mean")  # lr_j at position j-1
    for pos, v in enumerate(var):
        if lr_mean[pos] > 0:
            out[pos + 1] = float(v / lr_mean[pos])
    return out


# ----------------------------------------------------------------------------------------------
# Turning point (Algorithm 1)


Rule = Literal["guarded", "paper"]


class TurningPointDetector:
    """Online CS-Fluctuation and second-valley detection; see the module docstring for the rules.

    Call `update(step, cs, lr)` once per training step, with consecutive steps. It returns the
    turning-point step (a window boundary) the first time the second valley is final, else None.
    """

    def __init__(
        self,
        window: int,
        rule: Rule = "guarded",
        min_rise: float = 0.1,
        min_valley_distance: int | None = None,
        horizon: int | None = None,
    ) -> None:
        if window < 2:
            raise ValueError(f"window must be >= 2, got {window}")
        if rule not in ("guarded", "paper"):
            raise ValueError(f"rule must be 'guarded' or 'paper', got {rule!r}")
        if min_rise < 0:
            raise ValueError(f"min_rise must be >= 0, got {min_rise}")
        self.window = window
        self.rule = rule
        self.min_rise = float(min_rise)
        self.min_valley_distance = int(min_valley_distance) if min_valley_distance is not None else window
        self.horizon = int(horizon) if horizon is not None else 4 * window
        if self.horizon < 1:
            raise ValueError(f"horizon must be >= 1, got {horizon}")
        self._span = 3 * window - 1  # CS_{j-1} .. CS_{j+3M-3}
        self._cs: list[float] = []
        self._lr: list[float] = []
        self._first_step: int | None = None
        self._last_step: int | None = None
        self._series: list[tuple[int, float | None]] = []
        # detection samples (the CSF values the rule uses): steps, values (log10 for "guarded")
        self._st: list[int] = []
        self._y: list[float] = []
        self._sign = 0  # "paper": the sign of the last non-zero first difference
        self.valleys: list[int] = []
        self.valley_values: list[float] = []
        self.peaks: list[int] = []
        self.turning_point: int | None = None
        self.turning_valley: int | None = None  # the valley step before snapping
        self.confirmed_at: int | None = None  # the step at which the turning point was returned
        self._reset_valley(0)
        self._pos = 0  # next detection sample to process

    # -- public ----------------------------------------------------------------------------------

    @property
    def max_lag(self) -> int:
        """Upper bound of (step at which the turning point is returned) - (turning-point step)."""
        if self.rule == "paper":
            return csf_lag(self.window) + 1 + self.window // 2
        return self.horizon + self.min_valley_distance + csf_lag(self.window) + self.window // 2

    @property
    def series(self) -> list[tuple[int, float | None]]:
        """(step, CS-Fluctuation) computed so far, indexed as in `cs_fluctuation` (None: lr <= 0)."""
        return list(self._series)

    def is_boundary(self, step: int) -> bool:
        """Whether a snapshot of the weights after `step` may become the turning point's."""
        return step % self.window == 0

    def oldest_needed_step(self, current_step: int) -> int:
        """Boundary snapshots of steps before this one can no longer become the turning point."""
        return current_step - self.max_lag

    def update(self, step: int, cs: float, lr: float) -> int | None:
        if self._last_step is not None and step != self._last_step + 1:
            raise ValueError(
                f"TurningPointDetector.update: step {step} after {self._last_step}; steps must be consecutive"
            )
        if self._first_step is None:
            self._first_step = step
        self._last_step = step
        self._cs.append(float(cs))
        self._lr.append(float(lr))
        if len(self._cs) > self._span:
            del self._cs[0], self._lr[0]
        if len(self._cs) < self._span:
            return None
        j = step - csf_lag(self.window)  # the index step of the new CSF value
        lr_j = sum(self._lr[1:]) / (self._span - 1)  # steps j .. j+3M-3 (_cs[0] is CS_{j-1})
        var = float(_csf_core(np.asarray(self._cs), self.window)[0])
        found = self.observe_csf(j, var / lr_j if lr_j > 0 else None)
        if found is not None:
            self.confirmed_at = step
        return found

    def observe_csf(self, j: int, value: float | None) -> int | None:
        """Feed one CS-Fluctuation value (index step j, increasing) to the valley tracker.

        `update` calls it; it is public for replaying a CS-Fluctuation series computed elsewhere.
        Returns the turning point the first time it is final, else None.
        """
        if self._series and j <= self._series[-1][0]:
            raise ValueError(f"observe_csf: step {j} is not after {self._series[-1][0]}")
        if self._first_step is None:
            self._first_step = j
        self._series.append((j, value))
        if value is None or not math.isfinite(value) or self.turning_point is not None:
            return None
        if self.rule == "paper":
            return self._paper(j, value)
        if value <= 0:
            return None
        self._st.append(j)
        self._y.append(math.log10(value))
        self._run()
        if len(self.valleys) >= 2:
            # The second valley is final once no valley closer than min_valley_distance can still
            # merge into it: a third valley was counted, the search is past that distance (a peak
            # search, or a valley candidate beyond it: both only move forward), or a candidate
            # before it could no longer be confirmed (horizon).
            limit = self.valleys[1] + self.min_valley_distance
            cand = self._st[self._cand] if self._mode == "valley" and self._cand is not None else None
            if (
                len(self.valleys) >= 3
                or j >= limit + self.horizon
                or (self._mode == "peak" and j >= limit)
                or (cand is not None and cand >= limit)
            ):
                return self._final(j)
        return None

    @property
    def pending_turning_point(self) -> int | None:
        """The (snapped) second valley found so far but not yet final; the turning point once final."""
        if self.turning_point is not None:
            return self.turning_point
        return self._snap(self.valleys[1]) if len(self.valleys) >= 2 else None

    def _final(self, j: int) -> int:
        self.turning_valley = self.valleys[1]
        self.turning_point = self._snap(self.valleys[1])
        self.confirmed_at = j
        return self.turning_point

    def _paper(self, j: int, value: float) -> int | None:
        """Algorithm 1 as written: the second time the derivative of CSF turns from - to +."""
        if self._y:
            d = value - self._y[-1]
            if d > 0 and self._sign < 0:
                self.valleys.append(self._st[-1])
                self.valley_values.append(self._y[-1])
            elif d < 0 and self._sign > 0:
                self.peaks.append(self._st[-1])
            if d != 0:
                self._sign = 1 if d > 0 else -1
        self._st.append(j)
        self._y.append(value)
        return self._final(j) if len(self.valleys) >= 2 else None

    # -- detection ---------------------------------------------------------------------------------

    def _reset_valley(self, start: int) -> None:
        self._mode = "valley"
        self._seg = start  # first sample of the descent segment
        self._cand: int | None = None
        self._desc = -math.inf  # max over [seg .. cand]
        self._runmax = -math.inf  # max over [seg .. current]

    def _reset_peak(self) -> None:
        self._mode = "peak"
        self._pk: int | None = None
        self._post_min: int | None = None

    def _run(self) -> None:
        i = self._pos
        while i < len(self._y):
            nxt = self._valley_at(i) if self._mode == "valley" else self._peak_at(i)
            i = nxt if nxt is not None else i + 1
        self._pos = i

    def _valley_at(self, i: int) -> int | None:
        """Process sample i in valley mode; return the sample to resume from after a state change."""
        y, thr, st = self._y[i], self.min_rise, self._st
        self._runmax = max(self._runmax, y)
        c = self._cand
        if c is None or y < self._y[c]:
            self._cand, self._desc = i, self._runmax
            return None
        if y - self._y[c] > thr and self._desc - self._y[c] > thr and st[i] - st[c] <= self.horizon:
            self._confirm_valley(c, i)
            self._reset_peak()
            return c + 1
        if st[i] - st[c] >= self.horizon:  # a plateau, not a turn: restart after the candidate
            self._reset_valley(c + 1)
            return c + 1
        return None

    def _peak_at(self, i: int) -> int | None:
        y, thr = self._y[i], self.min_rise
        if self._pk is None or y > self._y[self._pk]:
            self._pk, self._post_min = i, None
            return None
        if self._post_min is None or y < self._y[self._post_min]:
            self._post_min = i
        if self._y[self._pk] - y > thr:
            pk = self._pk
            self.peaks.append(self._st[pk])
            self._reset_valley(pk)
            return pk
        return None

    def _confirm_valley(self, c: int, i: int) -> None:
        step, value = self._st[c], self._y[c]
        if self.valleys and step - self.valleys[-1] < self.min_valley_distance:
            if value < self.valley_values[-1]:
                self.valleys[-1], self.valley_values[-1] = step, value
        else:
            self.valleys.append(step)
            self.valley_values.append(value)

    def _snap(self, step: int) -> int:
        m = self.window
        lo = (step // m) * m
        b = lo if step - lo <= (lo + m) - step else lo + m
        first = self._first_step if self._first_step is not None else 0
        while b < first:
            b += m
        return b


__all__ = ["csf_lag", "cs_fluctuation", "Rule", "TurningPointDetector"]
