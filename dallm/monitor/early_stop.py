"""Early stopping of one run: the only place that holds its early-stop state.

`EarlyStop` owns CS every step (`dallm.monitor.cs`), the turning-point detector (`dallm.monitor.csf`), the turning
point and the step it was confirmed at (`seen_at`), the validation KIDs of the evaluated steps, the
in-memory weight snapshots, and the policy `[monitor]` describes: when to stop and which weights to
return. `dallm.engine.job.Job` asks it; it does no IO.

Snapshots (real copies, `TrainState`s)
- at window boundaries while no turning point is known, with the optimizer part (a rollback there
  can resume exactly); those older than the detector's `max_lag` are dropped, as they can no longer
  become the turning point;
- at evaluation steps when the policy compares validation KIDs (LoRA, text-encoder LoRA and token
  rows only: a few MB each on SD 1.5), so the best-KID step's complete weights can be returned;
- the turning point's own, kept once found.

Policy (`monitor.select`, see `dallm.config.MonitorConfig`)
- "turning": the turning point's weights (the last step's when none was found);
- "best_val_kid": the evaluated step with the lowest validation KID;
- "turning_then_best": the same choice, made when training stops `monitor.margin` steps after the
  turning point was confirmed (with `monitor.early_stop = "auto"`).
Without validation KID the KID choices fall back to "turning": CS-Fluctuation is the signal when
there is no held-out set.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from dallm.config import JobConfig, margin_steps, monitor_start, window_steps
from dallm.engine.checkpoint import TrainState


@dataclass
class Reading:
    cs: float | None
    cs_fluct: float | None  # the newest CS-Fluctuation value; it belongs to step `cs_fluct_step`
    cs_fluct_step: int | None  # = current step - 3 (window - 1): Eqs. 3-4 look ahead
    turning_point: int | None  # set once, at the step where the detector confirms it


@dataclass(frozen=True)
class Choice:
    """The step whose weights a run returns, and why."""

    step: int
    why: str  # turning | best_val_kid | last (no turning point, or no KID to compare)
    within_noise: tuple[int, ...] = ()  # evaluated steps whose KID is within one std of the chosen


def copy_weights(state: TrainState) -> TrainState:
    """A real copy of the weights of `state` (no optimizer part), on the CPU."""

    def cp(d: dict[str, Tensor] | None) -> dict[str, Tensor] | None:
        return None if d is None else {k: v.detach().to("cpu", copy=True) for k, v in d.items()}

    rows = state.token_rows.detach().to("cpu", copy=True) if state.token_rows is not None else None
    return TrainState(state.step, cp(state.unet_lora) or {}, cp(state.text_encoder_lora), rows)


class EarlyStop:
    def __init__(
        self,
        unet: Any,
        cfg: JobConfig,
        *,
        has_val_kid: bool,
        cs_fn: Callable[[], float] | None = None,
        train_size: int | None = None,
    ) -> None:
        """`cs_fn`: CS of the live weights (default: `dallm.monitor.cs.CosineSimilarity` of `unet`).
        `train_size`: training items (images, texts), for a window or margin in epochs; None counts
        data.dir's images (`dallm.config.training_set_size`)."""
        from dallm.monitor.cs import CosineSimilarity

        mc = cfg.monitor
        self.cfg = mc
        self.window = window_steps(cfg, train_size)
        self.margin = margin_steps(cfg, train_size)
        self.start = monitor_start(cfg)  # CS up to it is logged, not given to the detector (warm-up)
        self.cs_fn = (cs_fn or CosineSimilarity(unet)) if mc.cs else None
        self.detect = mc.cs and mc.early_stop != "off"
        self.select = mc.select if has_val_kid else "turning"
        self.history: list[tuple[int, float, float]] = []  # (step, cs, lr): replayed on resume
        self.kids: dict[int, tuple[float, float]] = {}  # step -> (validation KID, its std)
        self._snaps: dict[int, TrainState] = {}
        self._reset_detector()

    def _reset_detector(self) -> None:
        from dallm.monitor.csf import TurningPointDetector

        mc = self.cfg
        self.detector = TurningPointDetector(
            self.window, mc.rule, mc.min_rise, mc.min_valley_distance or self.window
        )
        self.turning_point: int | None = None
        self.seen_at: int | None = None  # the step at which the turning point was confirmed

    # -- every step ------------------------------------------------------------------------------

    def observe(self, step: int, lr: float) -> Reading:
        """CS of the current weights after `step`; a new turning point when the detector confirms one."""
        if self.cs_fn is None:
            return Reading(None, None, None, None)
        cs = float(self.cs_fn())
        new_tp = self._feed(step, cs, lr)
        fluct_step, fluct = self.latest_fluct()
        return Reading(cs, fluct, fluct_step, new_tp)

    def _feed(self, step: int, cs: float, lr: float) -> int | None:
        self.history.append((step, cs, lr))
        if step <= self.start:
            return None
        found = self.detector.update(step, cs, lr)
        if found is None or self.turning_point is not None or not self.detect:
            return None
        self.turning_point, self.seen_at = int(found), step
        return self.turning_point

    def latest_fluct(self) -> tuple[int | None, float | None]:
        """(index step, value) of the most recent CS-Fluctuation value."""
        series = self.detector.series
        if not series:
            return None, None
        step, value = series[-1]
        if value is None or not math.isfinite(value):
            return step, None
        return step, float(value)

    def should_stop(self, step: int) -> bool:
        """With early_stop = "auto": at the turning point's confirmation (+ margin for turning_then_best)."""
        if self.cfg.early_stop != "auto" or self.seen_at is None:
            return False
        return step >= self.seen_at + (self.margin if self.select == "turning_then_best" else 0)

    # -- snapshots -------------------------------------------------------------------------------

    def wants_snapshot(self, step: int) -> bool:
        """Keep the full state of `step` (a boundary that may still become the turning point)."""
        return self.detect and self.turning_point is None and step % self.window == 0

    def keep(self, state: TrainState) -> None:
        """Keep `state` (the caller's copy: `Trainer.state` deep-copies), then drop what no one needs."""
        self._snaps[state.step] = state
        self._prune(state.step)

    def record_kid(self, step: int, values: dict[str, float], state: TrainState | None) -> None:
        """The validation KID of an evaluated step; its weights (copied) when the policy compares KIDs."""
        if "kid_val" not in values:
            return
        self.kids[step] = (values["kid_val"], values.get("kid_val_std", 0.0))
        if self.select != "turning" and state is not None and step not in self._snaps:
            self._snaps[step] = copy_weights(state)

    def _prune(self, current: int) -> None:
        oldest = self.detector.oldest_needed_step(current)
        for s in list(self._snaps):
            if s < oldest and s != self.turning_point and not (self.select != "turning" and s in self.kids):
                del self._snaps[s]

    def snapshot(self, step: int) -> TrainState | None:
        """A fresh copy of the state kept at `step` (weights, and the optimizer part when kept), or None."""
        s = self._snaps.get(step)
        if s is None:
            return None
        out = copy_weights(s)
        out.optimizer, out.lr_scheduler, out.grad_scaler, out.rng = (
            s.optimizer,
            s.lr_scheduler,
            s.grad_scaler,
            s.rng,
        )
        return out

    def snapshots(self) -> list[TrainState]:
        return [s for s in (self.snapshot(step) for step in sorted(self._snaps)) if s is not None]

    # -- what to return --------------------------------------------------------------------------

    def choose(self, last: int) -> Choice:
        """The weights to return when training ends at step `last` (the stop step)."""
        if self.select != "turning":
            held = {s: k for s, k in self.kids.items() if s <= last and (s in self._snaps or s == last)}
            if held:
                best = min(held, key=lambda s: held[s][0])
                kid, std = held[best]
                near = tuple(sorted(s for s, (k, _) in held.items() if s != best and k - kid <= std))
                return Choice(best, "best_val_kid", near)
        if self.turning_point is not None and self.turning_point <= last:
            return Choice(self.turning_point, "turning")
        return Choice(last, "last")

    # -- resume / rollback -----------------------------------------------------------------------

    def rewind(self, step: int, history: list[tuple[int, float, float]] | None = None) -> None:
        """Forget everything after `step`: replay the history up to it into a fresh detector."""
        source = list(self.history if history is None else history)
        self.history = []
        self._reset_detector()
        for s, cs, lr in source:
            if s > step:
                break
            self._feed(s, cs, lr)
        self.kids = {s: k for s, k in self.kids.items() if s <= step}
        self._snaps = {s: v for s, v in self._snaps.items() if s <= step}


__all__ = ["Choice", "EarlyStop", "Reading", "copy_weights"]
