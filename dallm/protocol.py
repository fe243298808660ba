"""Messages between processes, defined once: every process (engine, worker, daemon, CLI, TUI) imports
this module. Events flow up from a training job; commands flow down to it.

The daemon section (requests, replies, framing, protocol version) is added by the daemon work.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ---------------------------------------------------------------------------------------------
# Events emitted by a training job (the engine calls `emit(event)`; a worker forwards them).


class MetricsEvent(_Message):
    """Scalars at one step: loss, lr, grad_norm, steps_per_s, cs, cs_fluct, kid_val, ..."""

    kind: Literal["metrics"] = "metrics"
    step: int
    values: dict[str, float]


class SampleEvent(_Message):
    """A sample grid made at `step` (fixed prompts x fixed seeds); `png` is a small thumbnail grid."""

    kind: Literal["sample"] = "sample"
    step: int
    path: str  # full-size grid on disk, relative to the job's output folder
    png: bytes = b""
    prompts: list[str] = Field(default_factory=list)


class CheckpointEvent(_Message):
    kind: Literal["checkpoint"] = "checkpoint"
    step: int
    path: str  # relative to the job's output folder


class TurningPointEvent(_Message):
    """The CS-Fluctuation detector found the turning point (second valley) at `step`, seen at `seen_at`."""

    kind: Literal["turning_point"] = "turning_point"
    step: int
    seen_at: int


class LogEvent(_Message):
    kind: Literal["log"] = "log"
    level: Literal["debug", "info", "warning", "error"] = "info"
    message: str


class StartedEvent(_Message):
    """The engine is ready and about to run steps `start_step + 1 .. total_steps`."""

    kind: Literal["started"] = "started"
    start_step: int
    total_steps: int
    device: str
    trainable_params: int


class RolledBackEvent(_Message):
    """Weights and optimizer state are now those of `step`; history after it is superseded."""

    kind: Literal["rolled_back"] = "rolled_back"
    step: int
    resume: bool


class FinishedEvent(_Message):
    """The engine is done: `result_step` is the step whose weights were written as the result."""

    kind: Literal["finished"] = "finished"
    reason: Literal["completed", "early_stop", "stopped", "rolled_back", "interrupted"]
    final_step: int
    result_step: int


JobEvent = Annotated[
    MetricsEvent
    | SampleEvent
    | CheckpointEvent
    | TurningPointEvent
    | LogEvent
    | StartedEvent
    | RolledBackEvent
    | FinishedEvent,
    Field(discriminator="kind"),
]
job_event_adapter: TypeAdapter[JobEvent] = TypeAdapter(JobEvent)


# ---------------------------------------------------------------------------------------------
# Commands a running job obeys between steps (the engine calls `poll()` once per step).


class StopCommand(_Message):
    """Finish now: with the turning-point weights when one was found, else the current ones."""

    kind: Literal["stop"] = "stop"


class RollbackCommand(_Message):
    """Restore the exact weights and optimizer state of `step`; finish there, or continue from it."""

    kind: Literal["rollback"] = "rollback"
    step: int
    resume: bool = False


class CheckpointNowCommand(_Message):
    kind: Literal["checkpoint_now"] = "checkpoint_now"


class InterruptCommand(_Message):
    """Write a checkpoint and exit so that the job can resume later (Ctrl-C, daemon shutdown)."""

    kind: Literal["interrupt"] = "interrupt"


JobCommand = Annotated[
    StopCommand | RollbackCommand | CheckpointNowCommand | InterruptCommand, Field(discriminator="kind")
]
job_command_adapter: TypeAdapter[JobCommand] = TypeAdapter(JobCommand)
