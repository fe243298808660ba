"""What the training loop (`dallm.engine.job.Job`) asks of an evaluator: `submit` the weights of a step,
`collect` the evaluations that came back (`Arrived`, in step order), `pending` steps, `close`.
`InLoopResults` is that interface for evaluators that evaluate in the loop's own process."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from dallm.engine.checkpoint import TrainState

Weights = Callable[[int], TrainState]  # the trainable weights of a step, copied (Trainer.weights)


@dataclass
class Arrived:
    """The evaluation of `step`: its metric values, and the weights it was made from when kept."""

    step: int
    values: dict[str, float]
    state: TrainState | None = None


class InLoopResults:
    """The loop's `collect` / `pending` / `close` for an evaluator that evaluates in the training
    process (`submit` appends to `_arrived` when its evaluation is done, so nothing is pending);
    shared by the image and the LLM evaluator. `BackgroundEvaluator` overrides all three."""

    _arrived: list[Arrived]

    def collect(self, wait_upto: int | None = None) -> list[Arrived]:
        """The evaluations finished since the last call, in step order (`wait_upto`: none is pending
        here, evaluations are finished when `submit` returns)."""
        out, self._arrived = self._arrived, []
        return out

    def pending(self) -> list[int]:
        """Steps submitted and not evaluated yet (none here)."""
        return []

    def close(self) -> None:
        """Nothing to release in the loop's own process."""


def steps_text(steps: list[int], most: int = 6) -> str:
    """`steps` for a log line: all of them, or the first and last few and how many (a backlog can
    hold dozens, and a wait says it once per evaluation)."""
    if len(steps) <= most:
        return str(steps)
    head, tail = ", ".join(map(str, steps[: most // 2])), ", ".join(map(str, steps[-2:]))
    return f"[{head}, ..., {tail}] ({len(steps)} steps)"
