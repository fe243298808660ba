"""A job's life in the daemon: its states, which changes are allowed, and the command a job carries
across a restart (`pending`).

    queued ──> running ──> stopping ──> finished | stopped | stopped-early | failed | cancelled
       ^  \\       \\______________________^                                 |
       |   ├──> stopping (a finish-only rollback: it writes a result, trains nothing)
       |   └──> failed | cancelled (never ran)                             |
       └───── running/stopping (interrupted, retried, daemon restart) <─── a rollback of an ended job

`pending` (a column of the jobs table) holds the stop, rollback or cancel asked of a job that has
not yet carried it out: a restarted daemon asks again (or, for a cancel, carries it out).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, TypeAdapter, ValidationError

from dallm.protocol import (
    TERMINAL_STATES,
    JobState,
    Message,
    ProtocolError,
    RollbackCommand,
    StopCommand,
)

ALLOWED: dict[str | None, frozenset[str]] = {
    None: frozenset({"queued"}),  # submitted
    "queued": frozenset({"running", "stopping", "failed", "cancelled"}),  # stopping: a finish-only rollback
    "running": frozenset({"stopping", "queued", *TERMINAL_STATES}),
    "stopping": frozenset({"stopping", "queued", *TERMINAL_STATES}),
    **{state: frozenset({"queued"}) for state in TERMINAL_STATES},  # rolled back to a checkpoint
}


def check_transition(job: int, prev: str | None, new: JobState) -> None:
    if new not in ALLOWED.get(prev, frozenset()):
        raise ProtocolError("conflict", f"job {job}: cannot go from {prev} to {new}")


class CancelPending(Message):
    """A cancel asked while the job's worker was still running."""

    kind: Literal["cancel"] = "cancel"


PendingCommand = Annotated[StopCommand | RollbackCommand | CancelPending, Field(discriminator="kind")]
_pending_adapter: TypeAdapter[PendingCommand] = TypeAdapter(PendingCommand)


def encode_pending(cmd: PendingCommand | None) -> str | None:
    return cmd.model_dump_json() if cmd is not None else None


def decode_pending(text: str | None) -> PendingCommand | None:
    """The `pending` column; stores written before it was typed held the JSON string "cancel"."""
    if not text:
        return None
    if text == '"cancel"':
        return CancelPending()
    try:
        return _pending_adapter.validate_json(text)
    except ValidationError:
        return None  # unreadable: the job runs on without it rather than the daemon failing to start
