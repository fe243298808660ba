"""Validation-free monitoring, part 2: CS-Fluctuation (Eqs. 3-4) and the turning point (Algorithm 1).

Source: "early-stopping-lora-cs-fluctuation" (../shared/papers), Section 3.2. Pure functions and small
classes over the CS series (`dallm.monitor` computes CS), and `SnapshotKeeper`, the weight copies
that let a trainer return the turning point's exact weights; no IO.

CS-Fluctuation (Eqs. 3-4), index alignment
    With M the window and the paper's forward windows "sum_{j}^{j+M}" read as the M values j..j+M-1:
        A_j   = mean(CS_j .. CS_{j+M-1})                        (Eq. 3, MA)
        dA_j  = A_j - A_{j-1}                                    (slope, first difference)
        X_j   = mean(dA_j .. dA_{j+M-1})                         (smoothed slope)
        CSF_j = (1/lr_j) * mean_{i=j..j+M-1} (X_i - mean(X_j..X_{j+M-1}))^2      (Eq. 4)
    CSF_j is indexed, as in the paper, at the first step of its windows: it depends on
    CS_{j-1} .. CS_{j+3M-3}, so it becomes known at step j + 3M - 3 (the paper's Algorithm 1 writes
    a lag of M, which counts one window; three nested forward windows of M values lag 3(M-1)).
    `lr_j` is the learning rate at step j (the index step); CSF_j is None where lr_j <= 0.
    The turning point is reported at that index step: the returned weights are those at the start
    of the calm window, as in the paper ("the checkpoint at the turning-point epoch").

Turning point (Algorithm 1, second valley) and its noise guard
    `TurningPointDetector` runs on the full-resolution CSF series and is a hysteresis ("zig-zag")
    valley/peak tracker:
    - A valley is the lowest point v of a descent (the curve fell more than `thr` into it) that is
      followed, within `horizon` steps, by a rise of more than `thr` above it, where
      thr = min_rise * (max - min of CSF seen so far). Peaks are confirmed symmetrically (a fall of
      more than `thr` below the highest point since the last valley); valleys and peaks alternate.
      With min_rise = 0 this is "the derivative turns from - to +" exactly; a bump smaller than
      `thr` never makes a valley.
    - A valley closer than `min_valley_distance` steps (default: window) to the previous one is
      merged into it (the lower of the two is kept) and is not counted. So that a merge can still
      move it, the second valley becomes final only when no valley closer than that can still be
      confirmed (at the latest `min_valley_distance + horizon` CSF steps after it).
    - A candidate whose rise does not come within `horizon` steps (default 4 * window) is not a
      turn but a plateau; the search restarts after it. This bounds the lag.
    - The turning point is the second (merged) valley, snapped to the nearest window boundary
      (steps that are multiples of `window`, ties to the earlier one, never before the first step
      seen), because the trainer keeps weight snapshots only at window boundaries; the snap moves it
      by at most window // 2 steps.
    Lag: the turning point b is returned by `update` at a step t with
        t - b <= max_lag = horizon + min_valley_distance + 3 * (window - 1) + window // 2
    (8.5 * window - 3 with the defaults), so a trainer that keeps the boundary snapshots of the last
    `max_lag` steps (SnapshotKeeper.drop_before(detector.oldest_needed_step(step))) always holds the
    weights of the turning point: at most max_lag // window + 1 snapshots (9 with the defaults),
    plus the turning point's own once found (SnapshotKeeper.pin).
    Until it is final, `pending_turning_point` gives the current candidate (e.g. when training ends).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

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
    `lr` is one learning rate or one per step (same length as `cs`).
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
    for pos, v in enumerate(var):
        j = pos + 1
        if lrs[j] > 0:
            out[j] = float(v / lrs[j])
    return out


# ----------------------------------------------------------------------------------------------
# Turning point (Algorithm 1)


class TurningPointDetector:
    """Online CS-Fluctuation and second-valley detection; see the module docstring for the rules.

    Call `update(step, cs, lr)` once per training step, with consecutive steps. It returns the
    turning-point step (a window boundary) the first time the second valley is confirmed, else None.
    """

    def __init__(
        self,
        window: int,
        min_rise: float = 0.1,
        min_valley_distance: int | None = None,
        horizon: int | None = None,
    ) -> None:
        if window < 2:
            raise ValueError(f"window must be >= 2, got {window}")
        if min_rise < 0:
            raise ValueError(f"min_rise must be >= 0, got {min_rise}")
        self.window = window
        self.min_rise = float(min_rise)
        self.min_valley_distance = int(min_valley_distance) if min_valley_distance is not None else window
        self.horizon = int(horizon) if horizon is not None else 4 * window
        if self.horizon < 1:
            raise ValueError(f"horizon must be >= 1, got {horizon}")
        span = 3 * window - 1  # CS_{j-1} .. CS_{j+3M-3}
        self._cs: list[float] = []
        self._lr: list[float] = []
        self._span = span
        self._first_step: int | None = None
        self._last_step: int | None = None
        self._series: list[tuple[int, float | None]] = []
        self._log: list[tuple[int, float, float]] = []  # raw inputs, for state_dict()
        # detection samples (non-None CSF): steps, values, the threshold known when each arrived
        self._st: list[int] = []
        self._y: list[float] = []
        self._thr: list[float] = []
        self._ymin = math.inf
        self._ymax = -math.inf
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
        return self.horizon + self.min_valley_distance + csf_lag(self.window) + self.window // 2

    @property
    def series(self) -> list[tuple[int, float | None]]:
        """(step, CS-Fluctuation) computed so far, indexed as in `cs_fluctuation` (None: lr <= 0)."""
        return list(self._series)

    def is_boundary(self, step: int) -> bool:
        """Whether the trainer should keep a snapshot of the weights after `step`."""
        return step % self.window == 0

    def oldest_needed_step(self, current_step: int) -> int:
        """Boundary snapshots of steps before this one can be dropped: they can no longer become the
        turning point. (Once found, the turning point's own snapshot is the trainer's to keep, e.g.
        with `SnapshotKeeper.pin`.)"""
        return current_step - self.max_lag

    def update(self, step: int, cs: float, lr: float) -> int | None:
        if self._last_step is not None and step != self._last_step + 1:
            raise ValueError(
                f"TurningPointDetector.update: step {step} after {self._last_step}; steps must be consecutive"
            )
        if self._first_step is None:
            self._first_step = step
        self._last_step = step
        self._log.append((int(step), float(cs), float(lr)))
        self._cs.append(float(cs))
        self._lr.append(float(lr))
        if len(self._cs) > self._span:
            del self._cs[0], self._lr[0]
        if len(self._cs) < self._span:
            return None
        j = step - csf_lag(self.window)  # the index step of the new CSF value
        lr_j = self._lr[1]  # _cs[0] is CS_{j-1}, _cs[1] is CS_j
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
        if self._st and j <= self._st[-1]:
            raise ValueError(f"observe_csf: step {j} is not after {self._st[-1]}")
        if self._first_step is None:
            self._first_step = j
        self._series.append((j, value))
        if value is None or not math.isfinite(value):
            return None
        self._ymin, self._ymax = min(self._ymin, value), max(self._ymax, value)
        self._st.append(j)
        self._y.append(value)
        self._thr.append(self.min_rise * (self._ymax - self._ymin))
        self._run()
        if self.turning_point is None and len(self.valleys) >= 2:
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
                v2 = self.valleys[1]
                self.turning_valley = v2
                self.turning_point = self._snap(v2)
                self.confirmed_at = j
                return self.turning_point
        return None

    @property
    def pending_turning_point(self) -> int | None:
        """The (snapped) second valley found so far but not yet final; the turning point once final."""
        if self.turning_point is not None:
            return self.turning_point
        return self._snap(self.valleys[1]) if len(self.valleys) >= 2 else None

    def state_dict(self) -> dict:
        """Everything needed to rebuild the detector (its inputs), JSON-serialisable."""
        return {
            "window": self.window,
            "min_rise": self.min_rise,
            "min_valley_distance": self.min_valley_distance,
            "horizon": self.horizon,
            "inputs": [list(t) for t in self._log],
        }

    @classmethod
    def from_state_dict(cls, state: Mapping) -> TurningPointDetector:
        det = cls(state["window"], state["min_rise"], state["min_valley_distance"], state["horizon"])
        for step, cs, lr in state["inputs"]:
            det.update(int(step), float(cs), float(lr))
        return det

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
        y, thr, st = self._y[i], self._thr[i], self._st
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
        y, thr = self._y[i], self._thr[i]
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


# ----------------------------------------------------------------------------------------------
# Snapshots


class SnapshotKeeper:
    """Real copies of a (LoRA) state dict at chosen steps, for returning the turning point exactly.

    `keep(step, state)` stores a detached copy of every tensor: on `device` ("cpu" by default, which
    costs a device-to-host copy per snapshot but no accelerator memory), or on each tensor's own
    device when `device=None`. Later in-place updates of the live tensors never change a kept copy.

    The trainer's loop, per step:
        if detector.is_boundary(step): keeper.keep(step, lora_state_dict)
        tp = detector.update(step, cs, lr)
        if tp is not None: keeper.pin(tp)          # keeper.get(tp) holds the turning-point weights
        keeper.drop_before(detector.oldest_needed_step(step))
    which holds at most max_lag // window + 1 boundary snapshots, plus the pinned turning point.
    """

    def __init__(self, device: str | torch.device | None = "cpu") -> None:
        self.device = torch.device(device) if device is not None else None
        self._snaps: dict[int, dict[str, Tensor]] = {}
        self._pinned: set[int] = set()

    def keep(self, step: int, state: Mapping[str, Tensor]) -> None:
        with torch.no_grad():
            if self.device is None:
                copy = {k: v.detach().clone() for k, v in state.items()}
            else:
                copy = {k: v.detach().to(self.device, copy=True) for k, v in state.items()}
        self._snaps[int(step)] = copy

    def get(self, step: int) -> dict[str, Tensor]:
        """The copy kept at `step` (the keeper's own tensors: clone them before modifying)."""
        try:
            return self._snaps[int(step)]
        except KeyError:
            raise KeyError(f"no snapshot kept at step {step} (kept: {self.steps})") from None

    def pin(self, step: int) -> None:
        """Keep the snapshot of `step` through `drop_before` (e.g. the turning point)."""
        if int(step) not in self._snaps:
            raise KeyError(f"no snapshot kept at step {step} (kept: {self.steps})")
        self._pinned.add(int(step))

    def drop_before(self, step: int) -> None:
        """Drop every unpinned snapshot older than `step` (e.g. detector.oldest_needed_step(current))."""
        for s in [s for s in self._snaps if s < step and s not in self._pinned]:
            del self._snaps[s]

    def drop(self, step: int) -> None:
        self._snaps.pop(int(step), None)
        self._pinned.discard(int(step))

    @property
    def pinned(self) -> list[int]:
        return sorted(self._pinned)

    @property
    def steps(self) -> list[int]:
        return sorted(self._snaps)

    def __contains__(self, step: object) -> bool:
        return step in self._snaps

    def __len__(self) -> int:
        return len(self._snaps)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for snap in self._snaps.values() for t in snap.values())


__all__ = ["csf_lag", "cs_fluctuation", "TurningPointDetector", "SnapshotKeeper"]
