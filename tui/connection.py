"""Everything the TUI needs from the daemon, behind one small interface, in the protocol's types
(`JobSummary`, `EventEnvelope`: dallm.protocol).

The app never talks to ZeroMQ itself: it drives a `Connection` from a worker thread (see `link.py`).
`daemon_connection.py` implements it over the daemon's client library; `dallm.testing.FakeConnection`
is an in-memory daemon for tests, the benchmark and `dallm-tui --demo`.

All methods are blocking and are called from worker threads only, never from the UI thread.
A lost daemon is reported by raising `ConnectionLost` from any method.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

from dallm.config import apply_overrides, config_from_dict, config_to_dict
from dallm.protocol import EventEnvelope, JobDetail, JobSummary, ResourcesReply, WorkerLogReply


class ConnectionLost(Exception):
    """The daemon cannot be reached (not running, went away, timed out)."""


@dataclass(frozen=True)
class Action:
    """A request the user makes from the keyboard."""

    kind: Literal["stop", "rollback", "cancel", "checkpoint", "priority", "clone"]
    job: int
    step: int | None = None  # rollback
    resume: bool = False  # rollback
    priority: int | None = None  # priority (the new absolute value)
    overrides: tuple[str, ...] = ()  # clone: `--set` items (KEY=VALUE) applied to the job's config

    def describe(self) -> str:
        if self.kind == "rollback":
            how = "resume" if self.resume else "finish"
            return f"rollback {self.job} to step {self.step} ({how})"
        if self.kind == "priority":
            return f"priority {self.job} -> {self.priority}"
        if self.kind == "checkpoint":
            return f"checkpoint {self.job} now"
        if self.kind == "clone":
            sets = " ".join(f"--set {o}" for o in self.overrides)
            return f"clone {self.job}" + (f" {sets}" if sets else "")
        return f"{self.kind} {self.job}"


@dataclass(frozen=True)
class Outcome:
    ok: bool
    message: str


def clone_config(config: dict, overrides: list[str], job: int) -> dict:
    """Job `job`'s config (as the daemon resolved it) with `--set` items applied, validated: a
    ConfigError names the key or the item. Its output_dir is dropped unless an item sets it, so
    the clone writes to a folder of its own rather than over the original's."""
    data = {k: v for k, v in config.items() if k != "output_dir"}
    data = apply_overrides(data, list(overrides))
    return config_to_dict(config_from_dict(data, f"clone of job {job}", list(overrides)))


@runtime_checkable
class Connection(Protocol):
    """A session with one daemon. `send` may be called from a thread other than the polling one."""

    endpoint: str

    def connect(self) -> None: ...

    def close(self) -> None: ...

    def list_jobs(self) -> list[JobSummary]: ...

    def job_history(self, job: int, since_seq: int = 0) -> list[EventEnvelope]: ...

    def poll_events(self, timeout: float) -> list[EventEnvelope]:
        """Live events in sequence order, waiting at most `timeout` seconds for the first one."""
        ...

    def send(self, action: Action) -> Outcome: ...

    def show(self, job: int) -> JobDetail:
        """What `dallm show` prints: the resolved config, transitions, checkpoints, last metrics."""
        ...

    def worker_log(self, job: int, offset: int | None = None) -> WorkerLogReply:
        """The tail of the job's worker log (offset None) or what was written since `offset`."""
        ...

    def resources(self) -> ResourcesReply: ...
