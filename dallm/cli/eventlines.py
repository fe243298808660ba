"""Log lines for `dallm logs -f`: the engine's progress (a line every 10% of the steps and at every
KID evaluation, checkpoints, turning point, rollback, finish) besides log lines and state changes."""

from __future__ import annotations

from typing import Any

from dallm.protocol import (
    CheckpointEvent,
    CheckpointsDeletedEvent,
    FinishedEvent,
    JobStateEvent,
    LogEvent,
    MetricsEvent,
    PhaseEvent,
    RolledBackEvent,
    SampleEvent,
    StartedEvent,
    TurningPointEvent,
)

# Metric names shown on a progress line, in this order, with their labels.
SHOWN = (
    ("loss", "loss"),
    ("cs_fluct", "cs-fluct"),
    ("kid_train", "KID train"),
    ("kid_val", "KID val"),
    ("ppl_val", "ppl val"),
    ("val_loss", "val loss"),
    ("fidelity", "prompt fidelity"),
)


def _with_spread(values: dict[str, float], key: str) -> str:
    """`0.134 ± 0.04 (std of the mean)`: a figure with its spread, named; else the value alone."""
    std = values.get(f"{key}_std")
    if std is None:
        return f"{values[key]:.4g}"
    which = "std of the mean" if key.endswith("_val") else "std over subsets"
    return f"{values[key]:.4g} ± {std:.2g} ({which})"


class EventLines:
    """(level, message) for an event of one job, or None for one not worth a line."""

    def __init__(self, total_steps: int) -> None:
        self.total = total_steps
        self.tenth = -1

    def _metrics(self, ev: MetricsEvent) -> tuple[str, str] | None:
        tenth = ev.step * 10 // self.total if self.total else ev.step
        evaluated = any(k.startswith(("kid_", "ppl_")) for k in ev.values)
        if tenth <= self.tenth and not evaluated:
            return None
        self.tenth = max(self.tenth, tenth)
        values = "".join(f"  {label} {_with_spread(ev.values, k)}" for k, label in SHOWN if k in ev.values)
        total = f"/{self.total}" if self.total else ""
        return "progress", f"step {ev.step}{total}{values}"

    def __call__(self, ev: Any) -> tuple[str, str] | None:
        if isinstance(ev, LogEvent):
            return ev.level, ev.message
        if isinstance(ev, JobStateEvent):
            return "state", f"{ev.job.state}: {ev.reason}"
        if isinstance(ev, MetricsEvent):
            return self._metrics(ev)
        if isinstance(ev, StartedEvent):
            self.total, self.tenth = ev.total_steps, ev.start_step * 10 // max(1, ev.total_steps)
            return "engine", (
                f"started at step {ev.start_step}/{ev.total_steps} on {ev.device}, "
                f"{ev.trainable_params:,} trainable parameters"
            )
        if isinstance(ev, PhaseEvent):  # only what stops training: "training" would repeat every stop
            return None if ev.phase == "training" else ("engine", f"{ev.phase} at step {ev.step}")
        if isinstance(ev, CheckpointEvent):
            return "engine", f"checkpoint of step {ev.step}: {ev.path}"
        if isinstance(ev, CheckpointsDeletedEvent):  # a rollback to them is no longer possible
            return "engine", f"checkpoint(s) of step {', '.join(map(str, ev.steps))} deleted ({ev.reason})"
        if isinstance(ev, SampleEvent):
            of = "the base model" if ev.base else f"step {ev.step}"
            return "engine", f"samples of {of}: {ev.path}"
        if isinstance(ev, TurningPointEvent):
            return "engine", f"turning point at step {ev.step} (seen at step {ev.seen_at})"
        if isinstance(ev, RolledBackEvent):
            self.tenth = ev.step * 10 // self.total if self.total else ev.step
            return "engine", f"rolled back to step {ev.step}" + (", training on" if ev.resume else "")
        if isinstance(ev, FinishedEvent):
            kid = ""
            if ev.result_kid_val is not None:
                std = (
                    f" ± {ev.result_kid_val_std:.2g} (std of the mean)"
                    if ev.result_kid_val_std is not None
                    else ""
                )
                kid = f", its KID val {ev.result_kid_val:.4g}{std}"
            chosen = f"; chosen: {ev.selection}" if ev.selection else ""
            return "engine", (
                f"done ({ev.reason}) at step {ev.final_step}; result = weights of step {ev.result_step}{kid}{chosen}"
            )
        return None
