"""The engine's side of monitoring: CS every step, CS-Fluctuation, the turning point, and the
in-memory weight snapshots that make the turning-point result exact.

The metrics themselves live in `dallm.monitor` (pure functions and small classes); this module
only wires them to a training run and keeps what a resume or a rollback needs: the (step, cs, lr)
history (saved in checkpoints and replayed into a fresh detector) and the snapshots.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from dallm.checkpoint import TrainState
from dallm.config import MonitorConfig


@dataclass
class Reading:
    cs: float | None
    cs_fluct: float | None
    turning_point: int | None  # set once, at the step where the detector confirms it


class Watch:
    def __init__(self, unet: Any, cfg: MonitorConfig) -> None:
        from dallm.monitor import CosineSimilarity, SnapshotKeeper, TurningPointDetector

        self.cfg = cfg
        self.cs_fn = CosineSimilarity(unet) if cfg.cs else None
        self._make_detector = lambda: TurningPointDetector(
            cfg.window, cfg.min_rise, cfg.min_valley_distance or cfg.window
        )
        self.detector = self._make_detector()
        self.keeper = SnapshotKeeper()
        self.history: list[tuple[int, float, float]] = []
        self.turning_point: int | None = None
        self.detect = cfg.cs and cfg.early_stop != "off"

    def update(self, step: int, lr: float) -> Reading:
        if self.cs_fn is None:
            return Reading(None, None, None)
        cs = float(self.cs_fn())
        self.history.append((step, cs, lr))
        found = self.detector.update(step, cs, lr)
        new_tp = None
        if found is not None and self.turning_point is None and self.detect:
            self.turning_point = new_tp = int(found)
        return Reading(cs, self.latest_fluct(), new_tp)

    def latest_fluct(self) -> float | None:
        """The most recent CS-Fluctuation value (it lags the current step by the window)."""
        series = self.detector.series
        if not series:
            return None
        last = series[-1]
        value = last[-1] if isinstance(last, tuple | list) else last
        value = float(value)
        return value if math.isfinite(value) else None

    # -- snapshots ---------------------------------------------------------------------------

    def wants_snapshot(self, step: int) -> bool:
        return self.detect and self.turning_point is None and step % self.cfg.window == 0

    def keep(self, state: TrainState) -> None:
        self.keeper.keep(state.step, state)
        oldest = self.detector.oldest_needed_step(state.step)
        for s in list(self.keeper.steps):
            if s < oldest and s != self.turning_point:
                self.keeper.drop(s)

    def snapshot(self, step: int) -> TrainState | None:
        return self.keeper.get(step) if step in self.keeper.steps else None

    def snapshots(self) -> list[TrainState]:
        return [self.keeper.get(s) for s in sorted(self.keeper.steps)]

    # -- resume / rollback ---------------------------------------------------------------------

    def rewind(self, step: int, history: list[tuple[int, float, float]] | None = None) -> None:
        """Forget everything after `step`: replay the history up to it into a fresh detector."""
        source = self.history if history is None else history
        self.history, self.detector, self.turning_point = [], self._make_detector(), None
        for s, cs, lr in source:
            if s > step:
                break
            self.history.append((s, cs, lr))
            found = self.detector.update(s, cs, lr)
            if found is not None and self.turning_point is None and self.detect:
                self.turning_point = int(found)
        for s in list(self.keeper.steps):
            if s > step:
                self.keeper.drop(s)
