"""Everything the TUI needs from the daemon, behind one small interface.

The app never talks to ZeroMQ itself: it drives a `Connection` from a worker thread (see `link.py`).
`FakeConnection` is an in-memory daemon for tests and for the benchmark; `daemon_connection.py`
implements the same interface over the daemon's client library.

All methods are blocking and are called from worker threads only, never from the UI thread.
A lost daemon is reported by raising `ConnectionLost` from any method.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Literal, Protocol, runtime_checkable

from dallm.protocol import (
    CheckpointEvent,
    FinishedEvent,
    JobEvent,
    MetricsEvent,
    RolledBackEvent,
    StartedEvent,
    TurningPointEvent,
)

JobState = Literal["queued", "running", "stopping", "finished", "stopped-early", "failed", "cancelled"]
TERMINAL_STATES = frozenset({"finished", "stopped-early", "failed", "cancelled"})


class ConnectionLost(Exception):
    """The daemon cannot be reached (not running, went away, timed out)."""


@dataclass(frozen=True)
class JobSummary:
    """One row of the queue, as the daemon lists it."""

    id: str
    name: str
    state: str = "queued"
    step: int = 0
    total_steps: int = 0
    priority: int = 0
    device: str = ""
    kid_val: float | None = None
    turning_point: int | None = None
    reason: str = ""  # why the job is in its state (the error of a failed job)
    steps_per_s: float | None = None


@dataclass(frozen=True)
class StateChange:
    """A job changed state (queue topic). `summary`, when given, replaces the job's row."""

    state: str
    reason: str = ""
    summary: JobSummary | None = None
    kind: Literal["state"] = "state"


Event = JobEvent | StateChange


@dataclass(frozen=True)
class Envelope:
    """An event of one job with the daemon-wide sequence number it was published under."""

    seq: int
    job: str
    event: Event
    superseded: bool = False  # history only: a later rollback replaced this part of the run


@dataclass(frozen=True)
class Action:
    """A request the user makes from the keyboard."""

    kind: Literal["stop", "rollback", "cancel", "priority"]
    job: str
    step: int | None = None  # rollback
    resume: bool = False  # rollback
    priority: int | None = None  # priority (the new absolute value)

    def describe(self) -> str:
        if self.kind == "rollback":
            how = "resume" if self.resume else "finish"
            return f"rollback {self.job} to step {self.step} ({how})"
        if self.kind == "priority":
            return f"priority {self.job} -> {self.priority}"
        return f"{self.kind} {self.job}"


@dataclass(frozen=True)
class Outcome:
    ok: bool
    message: str


@runtime_checkable
class Connection(Protocol):
    """A session with one daemon. `send` may be called from a thread other than the polling one."""

    endpoint: str

    def connect(self) -> None: ...

    def close(self) -> None: ...

    def list_jobs(self) -> list[JobSummary]: ...

    def job_history(self, job: str, since_seq: int = 0) -> list[Envelope]: ...

    def poll_events(self, timeout: float) -> list[Envelope]:
        """Live events in sequence order, waiting at most `timeout` seconds for the first one."""
        ...

    def send(self, action: Action) -> Outcome: ...


# ---------------------------------------------------------------------------------------------


@dataclass
class _FakeJob:
    summary: JobSummary
    history: list[Envelope] = field(default_factory=list)


class FakeConnection:
    """An in-memory daemon: tests script it (`add_job`, `emit`, `go_down`/`come_back`) and read back
    the actions it was sent (`sent`). Replies to actions come from `replies` (kind -> Outcome)."""

    def __init__(self, jobs: Iterable[JobSummary] = (), endpoint: str = "fake://daemon") -> None:
        self.endpoint = endpoint
        self._lock = threading.Condition()
        self._jobs: dict[str, _FakeJob] = {}
        self._seq = 0
        self._live: list[Envelope] = []
        self._up = True
        self._connected = False
        self.sent: list[Action] = []
        self.replies: dict[str, Outcome] = {}
        self.connects = 0
        for job in jobs:
            self.add_job(job)

    # -- scripting ------------------------------------------------------------------------------

    def add_job(self, summary: JobSummary) -> None:
        with self._lock:
            self._jobs[summary.id] = _FakeJob(summary)

    def emit(self, job: str, *events: Event, live: bool = True) -> None:
        """Record events for `job` (as the daemon's store would) and publish them when `live`."""
        with self._lock:
            fake = self._jobs[job]
            for event in events:
                self._seq += 1
                env = Envelope(self._seq, job, event)
                fake.history.append(env)
                fake.summary = apply_to_summary(fake.summary, event)
                if live and self._up and self._connected:
                    self._live.append(env)
            self._lock.notify_all()

    def go_down(self) -> None:
        with self._lock:
            self._up = False
            self._connected = False
            self._live.clear()
            self._lock.notify_all()

    def come_back(self) -> None:
        with self._lock:
            self._up = True

    def summary(self, job: str) -> JobSummary:
        with self._lock:
            return self._jobs[job].summary

    # -- Connection -----------------------------------------------------------------------------

    def _check(self) -> None:
        if not self._up:
            raise ConnectionLost(f"no daemon at {self.endpoint}")

    def connect(self) -> None:
        with self._lock:
            self._check()
            self._connected = True
            self.connects += 1

    def close(self) -> None:
        with self._lock:
            self._connected = False

    def list_jobs(self) -> list[JobSummary]:
        with self._lock:
            self._check()
            return [j.summary for j in self._jobs.values()]

    def job_history(self, job: str, since_seq: int = 0) -> list[Envelope]:
        with self._lock:
            self._check()
            fake = self._jobs.get(job)
            return [e for e in fake.history if e.seq > since_seq] if fake else []

    def poll_events(self, timeout: float) -> list[Envelope]:
        with self._lock:
            self._check()
            if not self._live:
                self._lock.wait(timeout)
            self._check()
            out, self._live = self._live, []
            return out

    def send(self, action: Action) -> Outcome:
        with self._lock:
            self._check()
            self.sent.append(action)
            if action.kind in self.replies:
                return self.replies[action.kind]
            fake = self._jobs.get(action.job)
            if fake is None:
                return Outcome(False, f"no such job: {action.job}")
            if action.kind == "priority":
                fake.summary = replace(fake.summary, priority=action.priority or 0)
                return Outcome(True, f"{action.job}: priority {action.priority}")
            verb = {"stop": "stopping", "cancel": "cancelling", "rollback": "rolling back"}[action.kind]
            return Outcome(True, f"{action.job}: {verb}")


def apply_to_summary(summary: JobSummary, event: Event) -> JobSummary:
    """What a job's row becomes after `event` (shared by the fake daemon and the app's model)."""
    if isinstance(event, StateChange):
        if event.summary is not None:
            return event.summary
        return replace(summary, state=event.state, reason=event.reason)
    if isinstance(event, MetricsEvent):
        kid = event.values.get("kid_val", summary.kid_val)
        sps = event.values.get("steps_per_s", summary.steps_per_s)
        return replace(summary, step=max(summary.step, event.step), kid_val=kid, steps_per_s=sps)
    if isinstance(event, StartedEvent):
        return replace(
            summary,
            state="running",
            step=event.start_step,
            total_steps=event.total_steps,
            device=event.device,
        )
    if isinstance(event, TurningPointEvent):
        return replace(summary, turning_point=event.step)
    if isinstance(event, RolledBackEvent):
        return replace(summary, step=event.step)
    if isinstance(event, FinishedEvent):
        return replace(summary, step=event.final_step)
    if isinstance(event, CheckpointEvent):
        return summary
    return summary
