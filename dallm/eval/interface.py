"""What the training loop (`dallm.engine.job.Job`) asks of an evaluator (`Evaluator`), whatever the
job kind: whether a step is `due`, `submit` the weights of a step, `collect` the evaluations that came
back (`Arrived`, in step order), the `pending` steps, the stop step's evaluation (`finish`), the
result's (`result`), `close`; and the name of its `validation_measure`, the metric early stopping
compares. `InLoopResults` is the part of that interface for evaluators that evaluate in the loop's
own process; `NoEvaluator` stands in for a job that evaluates nothing."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Protocol

from dallm.engine.checkpoint import TrainState
from dallm.eval.schedule import EvalSchedule
from dallm.monitor.selection import EvidenceSet

Weights = Callable[[int], TrainState]  # the trainable weights of a step, copied (Trainer.weights)


@dataclass
class Arrived:
    """The evaluation of `step`: its metric values, and the weights it was made from when kept."""

    step: int
    values: dict[str, float]
    state: TrainState | None = None


class Evaluator(Protocol):
    schedule: EvalSchedule
    # The metric of the held-out set ("kid_val", "ppl_val"; lower is better), with "<name>_std";
    # None: this evaluator has none.
    validation_measure: str | None

    def due(self, step: int) -> bool: ...

    def submit(self, step: int, weights: Weights) -> None: ...

    def collect(self, wait_upto: int | None = None) -> list[Arrived]: ...

    def pending(self) -> list[int]: ...

    def finish(self, final_step: int) -> dict[str, float]:
        """The stop step's evaluation (unless made already) and the cost summary."""
        ...

    def result(
        self,
        result_step: int,
        turning_step: int | None,
        final_step: int,
        result_weights: AbstractContextManager[None],
    ) -> dict[str, float]:
        """The measures of the result (result_*, turning_*); `result_weights` holds the result's
        complete weights in the model while it is entered."""
        ...

    def close(self) -> None: ...

    def evidence(self, steps: list[int]) -> EvidenceSet | None:
        """What monitor.select = "evidence" compares at the evaluated `steps` (None: nothing measured)."""
        ...


class Work(Protocol):
    """Who makes the samples and KIDs that `finish` and `result` ask for, and what it cost the
    trainer: the `LiveEvaluator` itself, or the background evaluator's process."""

    def samples(self, step: int) -> None: ...

    def evaluate(self, step: int) -> dict[str, float]: ...

    def trainer_seconds(self) -> float: ...

    def work_summary(self) -> dict[str, float]: ...


class InLoopResults:
    """The loop's `collect` / `pending` / `close` for an evaluator that evaluates in the training
    process (`submit` appends to `_arrived` when its evaluation is done, so nothing is pending);
    shared by the image and the LLM evaluator. `BackgroundEvaluator` has its own three."""

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

    def evidence(self, steps: list[int]) -> EvidenceSet | None:
        """None: no evidence beyond the validation measure (an evaluator with more overrides this)."""
        return None


class NoEvaluator(InLoopResults):
    """The evaluator of a job without samples or measures: nothing is ever due."""

    validation_measure: str | None = None

    def __init__(self, schedule: EvalSchedule) -> None:
        self.schedule = schedule
        self._arrived: list[Arrived] = []

    def due(self, step: int) -> bool:
        return False

    def submit(self, step: int, weights: Weights) -> None:
        raise RuntimeError(f"NoEvaluator: nothing is due at step {step}")

    def finish(self, final_step: int) -> dict[str, float]:
        return {}

    def result(
        self,
        result_step: int,
        turning_step: int | None,
        final_step: int,
        result_weights: AbstractContextManager[None],
    ) -> dict[str, float]:
        return {}


def steps_text(steps: list[int], most: int = 6) -> str:
    """`steps` for a log line: all of them, or the first and last few and how many (a backlog can
    hold dozens, and a wait says it once per evaluation)."""
    if len(steps) <= most:
        return str(steps)
    head, tail = ", ".join(map(str, steps[: most // 2])), ", ".join(map(str, steps[-2:]))
    return f"[{head}, ..., {tail}] ({len(steps)} steps)"
