"""What a training job says and hears: engine events (up), commands (down), and its result.

The engine calls `emit(event)` and, once per step, `poll()` for a command; a worker forwards both.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal, Protocol, get_args

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

if TYPE_CHECKING:
    from dallm.config import JobConfig


class Message(BaseModel):
    """Every message of the protocol: strict (unknown fields are an error) and immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# --- events ----------------------------------------------------------------------------------


class MetricsEvent(Message):
    """Scalars at one step: loss, lr, grad_norm, steps_per_s, cs, cs_fluct, kid_val, ..."""

    kind: Literal["metrics"] = "metrics"
    step: int
    values: dict[str, float]


class SampleEvent(Message):
    """Samples made at `step` for fixed prompts (x fixed seeds): an image job's grid (`png` is a
    small thumbnail of it), or an LLM job's generated texts (`texts`, one per prompt and seed)."""

    kind: Literal["sample"] = "sample"
    step: int
    path: str  # full-size grid (or the texts' file) on disk, relative to the job's output folder
    png: bytes = b""
    prompts: list[str] = Field(default_factory=list)  # the grid's rows
    seeds: list[int] = Field(default_factory=list)  # the grid's columns
    base: bool = False  # the base model's grid (before any training), sent once with step 0
    texts: list[str] = Field(default_factory=list)  # an LLM job's generations (no png)


class CheckpointEvent(Message):
    kind: Literal["checkpoint"] = "checkpoint"
    step: int
    path: str  # relative to the job's output folder


class TurningPointEvent(Message):
    """The CS-Fluctuation detector found the turning point (second valley) at `step`, seen at `seen_at`."""

    kind: Literal["turning_point"] = "turning_point"
    step: int
    seen_at: int
    stop_at: int | None = None  # the step the engine will stop at (early_stop = "auto"): the ETA ends there


class LogEvent(Message):
    kind: Literal["log"] = "log"
    level: Literal["debug", "info", "warning", "error"] = "info"
    message: str


JobKind = Literal["image", "llm"]  # model.kind: what a job trains


class StartedEvent(Message):
    """The engine is ready and about to run steps `start_step + 1 .. total_steps`."""

    kind: Literal["started"] = "started"
    start_step: int
    total_steps: int
    device: str
    trainable_params: int
    # When the engine stops to evaluate (0: never); with the measured cost, what the ETA adds.
    eval_every: int = 0  # KID
    samples_every: int = 0  # sample grids
    job_kind: JobKind | None = None  # model.kind (None: an engine that does not say)
    # The metric of the held-out set that early stopping compares ("kid_val", "ppl_val"; its
    # spread is "<name>_std"); None: the job measures none.
    validation_measure: str | None = None


# "loading": set by the daemon when it starts a worker (the engine loads model and data).
Phase = Literal["loading", "training", "sampling", "kid", "checkpointing", "stopping"]
PHASES: tuple[str, ...] = get_args(Phase)


class PhaseEvent(Message):
    """The engine began `phase` at `step` (Unix time `at`): says what a step counter that does not
    move is waiting for (evaluation, a checkpoint, the final result)."""

    kind: Literal["phase"] = "phase"
    phase: Phase
    step: int
    at: float


class UsageEvent(Message):
    """The worker's peak memory so far (emitted by the worker, not the engine, every few seconds
    and at the end): resident memory of the process and, on a GPU, torch's peak allocation."""

    kind: Literal["usage"] = "usage"
    peak_rss_mb: float
    peak_gpu_mb: float | None = None


class RolledBackEvent(Message):
    """Weights and optimizer state are now those of `step`; history after it is superseded."""

    kind: Literal["rolled_back"] = "rolled_back"
    step: int
    resume: bool


class CheckpointsDeletedEvent(Message):
    """Checkpoint folders the engine deleted (`checkpoint.keep`, or superseded by a rollback): a
    rollback to these steps is no longer possible."""

    kind: Literal["checkpoints_deleted"] = "checkpoints_deleted"
    steps: list[int]
    reason: str  # "checkpoint.keep = 2", "superseded by the rollback to step 40"


class ProgressEvent(Message):
    """The trainer's own step, sent about once a second whatever the metrics rows wait for: with
    evaluation in the background the rows (MetricsEvent) of the steps after a running evaluation
    are held until it is back. `values`: loss, lr, steps_per_s, cs (the last known); `backlog`:
    evaluations still running."""

    kind: Literal["progress"] = "progress"
    step: int
    values: dict[str, float]
    backlog: int = 0


FinishReason = Literal["completed", "early_stop", "stopped", "rolled_back", "interrupted"]


class Outcome(Message):
    """How a job's run ended: the part that `FinishedEvent` and `JobResult` share."""

    reason: FinishReason
    final_step: int  # the last step trained
    result_step: int  # the step whose weights were written as the result
    result_kid_val: float | None = None  # validation KID of the result weights, when measured
    result_kid_val_std: float | None = None  # its spread (the std of the mean)
    # With monitor.select = "evidence": which signal chose the result and by what paired margin
    # (`dallm.monitor.selection.Selection.describe`); result_kid_val is then the held-out half's.
    selection: str | None = None


class FinishedEvent(Outcome):
    """The engine is done: `result_step` is the step whose weights were written as the result."""

    kind: Literal["finished"] = "finished"


class JobResult(Outcome):
    """What the engine returns (`dallm.engine.dispatch.train`), and what a worker reports when it returns."""

    out_dir: Path
    turning_point: int | None = None
    seen_at: int | None = None  # the step at which the turning point was confirmed

    def finished_event(self) -> FinishedEvent:
        return FinishedEvent(**self.model_dump(include=set(Outcome.model_fields)))


JobEventTypes = (
    MetricsEvent
    | SampleEvent
    | CheckpointEvent
    | TurningPointEvent
    | LogEvent
    | StartedEvent
    | RolledBackEvent
    | FinishedEvent
    | PhaseEvent
    | UsageEvent
    | CheckpointsDeletedEvent
    | ProgressEvent
)
JobEvent = Annotated[JobEventTypes, Field(discriminator="kind")]
job_event_adapter: TypeAdapter[JobEvent] = TypeAdapter(JobEvent)


# --- commands a running job obeys between steps ----------------------------------------------


class StopCommand(Message):
    """Finish now: with the turning-point weights when one was found, else the current ones."""

    kind: Literal["stop"] = "stop"


class RollbackCommand(Message):
    """Restore the exact weights and optimizer state of `step`; finish there, or continue from it."""

    kind: Literal["rollback"] = "rollback"
    step: int
    resume: bool = False


class CheckpointNowCommand(Message):
    kind: Literal["checkpoint_now"] = "checkpoint_now"


class InterruptCommand(Message):
    """Write a checkpoint and exit so that the job can resume later (Ctrl-C, daemon shutdown)."""

    kind: Literal["interrupt"] = "interrupt"


JobCommand = Annotated[
    StopCommand | RollbackCommand | CheckpointNowCommand | InterruptCommand, Field(discriminator="kind")
]
job_command_adapter: TypeAdapter[JobCommand] = TypeAdapter(JobCommand)


# --- the engine contract ---------------------------------------------------------------------

Emit = Callable[[JobEvent], None]
Poll = Callable[[], JobCommand | None]


class PhaseEmit:
    """`emit` that forwards a `PhaseEvent` only when the phase changes: the loop re-enters
    "training" after every evaluation or checkpoint, and the evaluator names its own phases."""

    def __init__(self, emit: Emit) -> None:
        self.inner = emit
        self.phase: str | None = None

    def __call__(self, event: JobEvent) -> None:
        if isinstance(event, PhaseEvent):
            if event.phase == self.phase:
                return
            self.phase = event.phase
        self.inner(event)

    def enter(self, phase: Phase, step: int) -> None:
        if phase != self.phase:  # checked first: "training" is asked for every step
            self(PhaseEvent(phase=phase, step=step, at=time.time()))


class Engine(Protocol):
    """What runs a job: `dallm.engine.dispatch.train`, or a test double. It emits events, obeys the commands
    `poll` hands it between steps, writes into `out_dir` and returns the result; drawing progress
    is the caller's business (wrap `emit`)."""

    def __call__(
        self,
        cfg: JobConfig,
        *,
        out_dir: Path | None = None,
        resume: Path | None = None,
        emit: Emit | None = None,
        poll: Poll | None = None,
    ) -> JobResult: ...
