"""The engine's side of monitoring: CS every step, CS-Fluctuation, the turning point, and the
in-memory weight snapshots that make the turning-point result exact.

The metrics themselves live in `dallm.monitor` (CS) and `dallm.turning` (CS-Fluctuation, the
turning point), pure functions and small classes; this module only wires them to a training run and keeps what a resume or a rollback needs: the (step, cs, lr)
history (saved in checkpoints and replayed into a fresh detector) and the snapshots.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from dallm.checkpoint import TrainState
from dallm.config import MonitorConfig


@dataclass
class Reading:
    cs: float | None
    cs_fluct: float | None  # the newest CS-Fluctuation value; it belongs to step `cs_fluct_step`
    cs_fluct_step: int | None  # = current step - 3 (window - 1): Eqs. 3-4 look ahead
    turning_point: int | None  # set once, at the step where the detector confirms it


def flat_weights(state: TrainState) -> dict[str, Tensor]:
    out = {f"unet.{k}": v for k, v in state.unet_lora.items()}
    out.update({f"text_encoder.{k}": v for k, v in (state.text_encoder_lora or {}).items()})
    if state.token_rows is not None:
        out["token_rows"] = state.token_rows
    return out


def unflat_weights(step: int, flat: dict[str, Tensor]) -> TrainState:
    unet = {k[5:]: v.clone() for k, v in flat.items() if k.startswith("unet.")}
    te = {k[13:]: v.clone() for k, v in flat.items() if k.startswith("text_encoder.")}
    rows = flat.get("token_rows")
    return TrainState(step, unet, te or None, rows.clone() if rows is not None else None)


class Watch:
    def __init__(self, unet: Any, cfg: MonitorConfig, start: int = 0) -> None:
        """`start`: CS of steps up to it is logged but not given to the detector (warm-up)."""
        from dallm.monitor import CosineSimilarity
        from dallm.turning import SnapshotKeeper, TurningPointDetector

        self.cfg = cfg
        self.cs_fn = CosineSimilarity(unet) if cfg.cs else None
        self._make_detector = lambda: TurningPointDetector(
            cfg.window, cfg.min_rise, cfg.min_valley_distance or cfg.window
        )
        self.detector = self._make_detector()
        self.start = start
        self.keeper = SnapshotKeeper()  # weights at window boundaries
        self._rest: dict[int, TrainState] = {}  # optimizer / scheduler / RNG of the same steps
        self.history: list[tuple[int, float, float]] = []
        self.turning_point: int | None = None
        self.detect = cfg.cs and cfg.early_stop != "off"

    def update(self, step: int, lr: float) -> Reading:
        if self.cs_fn is None:
            return Reading(None, None, None, None)
        cs = float(self.cs_fn())
        self.history.append((step, cs, lr))
        found = self.detector.update(step, cs, lr) if step > self.start else None
        new_tp = None
        if found is not None and self.turning_point is None and self.detect:
            self.turning_point = new_tp = int(found)
        fluct_step, fluct = self.latest_fluct()
        return Reading(cs, fluct, fluct_step, new_tp)

    def latest_fluct(self) -> tuple[int | None, float | None]:
        """(index step, value) of the most recent CS-Fluctuation value."""
        series = self.detector.series
        if not series:
            return None, None
        step, value = series[-1]
        if value is None or not math.isfinite(value):
            return step, None
        return step, float(value)

    # -- snapshots ---------------------------------------------------------------------------

    def wants_snapshot(self, step: int) -> bool:
        return self.detect and self.turning_point is None and step % self.cfg.window == 0

    def keep(self, state: TrainState) -> None:
        """Keep a real copy of `state` (weights, and the optimizer part when it has one)."""
        self.keeper.keep(state.step, flat_weights(state))
        if state.resumable:
            self._rest[state.step] = state  # the caller's copy: Trainer.state() deep-copies
        self.keeper.drop_before(self.detector.oldest_needed_step(state.step))
        self._rest = {s: v for s, v in self._rest.items() if s in self.keeper}

    def snapshot(self, step: int) -> TrainState | None:
        """A fresh copy of the state kept at `step`, or None."""
        if step not in self.keeper:
            return None
        state = unflat_weights(step, self.keeper.get(step))
        rest = self._rest.get(step)
        if rest is not None:
            state.optimizer, state.lr_scheduler = rest.optimizer, rest.lr_scheduler
            state.grad_scaler, state.rng = rest.grad_scaler, rest.rng
        return state

    def snapshots(self) -> list[TrainState]:
        return [s for s in (self.snapshot(step) for step in self.keeper.steps) if s is not None]

    # -- resume / rollback ---------------------------------------------------------------------

    def rewind(self, step: int, history: list[tuple[int, float, float]] | None = None) -> None:
        """Forget everything after `step`: replay the history up to it into a fresh detector."""
        source = self.history if history is None else history
        self.history, self.detector, self.turning_point = [], self._make_detector(), None
        for s, cs, lr in source:
            if s > step:
                break
            self.history.append((s, cs, lr))
            if s <= self.start:
                continue
            found = self.detector.update(s, cs, lr)
            if found is not None and self.turning_point is None and self.detect:
                self.turning_point = int(found)
        for s in list(self.keeper.steps):
            if s > step:
                self.keeper.drop(s)
                self._rest.pop(s, None)
