"""Results of a step that arrive after the step (`eval.mode = "background"`): the job goes on training
while its evaluations run, yet each step gets one metrics row and one `MetricsEvent`, with its KID,
in step order, and a checkpoint's history holds the KIDs up to its step.

`LateResults` keeps
- held rows: the rows from the oldest step whose evaluation is still running, written and sent
  once the evaluations before them are back;
- deferred checkpoints: states waiting for the KIDs up to their step, written once those are back;
- the backlog warning: said once when the evaluator falls behind for good.
With an evaluator that evaluates in the loop nothing is ever pending, and rows go out at once.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from dallm.engine.checkpoint import TrainState
from dallm.engine.metrics_log import MetricsLog
from dallm.eval.interface import Arrived, steps_text
from dallm.protocol import Emit, LogEvent, MetricsEvent

BEHIND_WARN = 3  # a background evaluator this many evaluations behind, and falling back, is said once


class LateResults:
    def __init__(
        self,
        pending: Callable[[], list[int]],
        log: MetricsLog,
        emit: Emit,
        write_checkpoint: Callable[[TrainState], Path],
    ) -> None:
        """`pending`: the steps whose evaluation is still running (the evaluator's)."""
        self.pending, self.log, self.emit, self.write_checkpoint = pending, log, emit, write_checkpoint
        self._held: list[tuple[int, dict[str, float]]] = []
        self._deferred: list[TrainState] = []  # checkpoints waiting for the KIDs up to their step
        self._answered = False  # an evaluation came back (the evaluator's start-up is over)
        self._last_backlog = 0  # evaluations pending after the previous request
        self._behind_said = False

    def arrive(self, arrived: list[Arrived], step: int) -> dict[str, float]:
        """Put finished evaluations (in step order) into their held rows, which go out once complete.
        Returns the values of the current `step` (inline: evaluated just now), for its own row."""
        now: dict[str, float] = {}
        self._answered = self._answered or bool(arrived)
        for a in arrived:
            if a.step == step and not any(s == a.step for s, _ in self._held):
                now = a.values
                continue
            for s, row in self._held:
                if s == a.step:
                    row.update(a.values)
        self._release()
        return now

    def row(self, step: int, values: dict[str, float]) -> None:
        """The step's row into metrics.jsonl and its `MetricsEvent`: now, or held (in order) while an
        evaluation up to it runs, so that each step has one row and one event, with its KID."""
        if self._held or any(s <= step for s in self.pending()):
            self._held.append((step, dict(values)))
        else:
            self.log.write(step, values)
            self.emit(MetricsEvent(step=step, values=values))

    def _release(self) -> None:
        """Write and send the held rows before the oldest evaluation still running."""
        oldest = min(self.pending(), default=None)
        while self._held and (oldest is None or self._held[0][0] < oldest):
            step, row = self._held.pop(0)
            self.log.write(step, row)
            self.emit(MetricsEvent(step=step, values=row))

    def waits(self, step: int) -> bool:
        """Whether a checkpoint of `step` must wait: evaluations up to it are still running."""
        return any(s <= step for s in self.pending())

    def defer(self, state: TrainState) -> None:
        self._deferred.append(state)

    def write_deferred(self) -> None:
        """Write the deferred checkpoints whose KIDs are all back."""
        while self._deferred and not self.waits(self._deferred[0].step):
            self.write_checkpoint(self._deferred.pop(0))

    def say_behind(self) -> None:
        """Say once that the background evaluator cannot keep up: it has answered (its start-up is
        over), yet BEHIND_WARN or more are pending and none came back since the last request."""
        pending = self.pending()
        growing, self._last_backlog = len(pending) > self._last_backlog, len(pending)
        if self._behind_said or not self._answered or not growing or len(pending) < BEHIND_WARN:
            return
        self._behind_said = True
        msg = (
            f"the background evaluation is {len(pending)} evaluations behind training (pending: steps "
            f"{steps_text(pending)}); metrics rows and checkpoints from step {pending[0]} on, and the stop, "
            "wait for it; a larger eval.every or fewer eval images (eval.num_images, eval.kid_std_target, "
            "eval.max_images) let it keep up"
        )
        self.emit(LogEvent(level="warning", message=msg))


__all__ = ["BEHIND_WARN", "LateResults"]
