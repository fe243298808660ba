"""How the TUI talks to a daemon: `Connection`, the requests it makes in the protocol's types
(`JobSummary`, `EventEnvelope`: dallm.protocol), and `DaemonConnection`, the one over the daemon's
client library (`dallm.client.client`). `dallm.testing.FakeConnection` is an in-memory daemon for
tests, the benchmark and `dallm-tui --demo`. The thread that drives a connection for the app is
`feed.py`'s `DaemonFeed`; the app never talks to ZeroMQ itself.

All methods block and are called from worker threads only, never from the UI thread. A lost daemon
is reported by raising `ConnectionLost` from any method.

`DaemonConnection` holds two clients, as the client library asks (each is for one thread): one for
the feed thread (queue, histories, heartbeat) with the live subscription, one for actions sent from
thread workers. The subscription takes every topic live from the moment of connecting (rows of
every job stay current); a job's history is read from the store when the user first looks at it,
and again since the last seq after a reconnect.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol, TypeVar, runtime_checkable

from dallm.client.client import DaemonClient, DaemonError, DaemonUnavailable, Subscription
from dallm.client.home import resolve_home
from dallm.config import ConfigError, apply_overrides, config_from_dict, config_to_dict, run_name
from dallm.protocol import EventEnvelope, JobDetail, JobSummary, ResourcesReply, WorkerLogReply, job_topic

T = TypeVar("T")

HEARTBEAT_S = 2.0  # ping the daemon when the event stream was quiet this long


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
class ActionResult:
    """The daemon's answer to an `Action` (or why it was not sent), one line for the user."""

    ok: bool
    message: str


def clone_config(config: dict, overrides: list[str], job: int) -> dict:
    """Job `job`'s config (as the daemon resolved it) with `--set` items applied, validated, and
    named by them (`run_name`): a ConfigError names the key or the item. Its output_dir is dropped unless an item sets it, so
    the clone writes to a folder of its own rather than over the original's."""
    data = {k: v for k, v in config.items() if k != "output_dir"}
    data = apply_overrides(data, list(overrides))
    cfg = config_from_dict(data, f"clone of job {job}", list(overrides))
    return config_to_dict(run_name(cfg, list(overrides)))  # "quickstart rank=8" unless named


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

    def send(self, action: Action) -> ActionResult: ...

    def show(self, job: int) -> JobDetail:
        """What `dallm show` prints: the resolved config, transitions, checkpoints, last metrics."""
        ...

    def worker_log(self, job: int, offset: int | None = None) -> WorkerLogReply:
        """The tail of the job's worker log (offset None) or what was written since `offset`."""
        ...

    def resources(self) -> ResourcesReply: ...


class DaemonConnection:
    """`Connection` over the daemon's client library (what `dallm-tui` uses)."""

    def __init__(self, endpoint: str | None = None, home: str | None = None, timeout: float = 5.0) -> None:
        self._endpoint_arg, self._home, self.timeout = endpoint, home, timeout
        self.endpoint = endpoint or self._describe()
        self._client: DaemonClient | None = None
        self._sub: Subscription | None = None
        self._action_client: DaemonClient | None = None
        self._action_lock = threading.Lock()
        self._quiet_since = time.monotonic()

    def _describe(self) -> str:
        try:
            return f"home {resolve_home(self._home)}"
        except (OSError, RuntimeError):  # no home directory to be found
            return "local daemon"

    def _new_client(self) -> DaemonClient:
        try:
            return DaemonClient(self._endpoint_arg, home=self._home, timeout=self.timeout)
        except DaemonError as e:
            raise ConnectionLost(str(e)) from None

    # -- Connection -----------------------------------------------------------------------------

    def connect(self) -> None:
        self.close()
        client = self._new_client()
        try:
            client.ping()
            self._sub = client.subscribe(topics=None, since=None, resync_s=10.0)
        except DaemonError as e:
            client.close()
            raise ConnectionLost(str(e)) from None
        self._client = client
        self.endpoint = self._endpoint_arg or client.endpoint
        self._quiet_since = time.monotonic()

    def close(self) -> None:
        if self._sub is not None:
            self._sub.close()
            self._sub = None
        if self._client is not None:
            self._client.close()
            self._client = None

    def _live_client(self) -> DaemonClient:
        if self._client is None:
            raise ConnectionLost("not connected")
        return self._client

    def list_jobs(self) -> list[JobSummary]:
        try:
            return self._live_client().jobs()
        except DaemonUnavailable as e:
            raise ConnectionLost(str(e)) from None

    def job_history(self, job: int, since_seq: int = 0) -> list[EventEnvelope]:
        try:
            events, _ = self._live_client().history_all(since_seq, [job_topic(job)])
        except DaemonUnavailable as e:
            raise ConnectionLost(str(e)) from None
        # Events a rollback replaced come flagged: the model keeps their metrics apart (drawn dim).
        return events

    def poll_events(self, timeout: float) -> list[EventEnvelope]:
        if self._sub is None:
            raise ConnectionLost("not connected")
        try:
            events = self._sub.drain(timeout)
        except DaemonUnavailable as e:
            raise ConnectionLost(str(e)) from None
        now = time.monotonic()
        if events:
            self._quiet_since = now
        elif now - self._quiet_since >= HEARTBEAT_S:
            # A SUB socket does not notice a dead publisher: ask the daemon whether it is there.
            self._quiet_since = now
            try:
                self._live_client().ping(timeout=min(self.timeout, 2.0))
            except DaemonUnavailable as e:
                raise ConnectionLost(str(e)) from None
        return events

    def _ask(self, call: Callable[[DaemonClient], T]) -> T:
        """A request on the actions' client (any thread); a refusal raises DaemonError."""
        with self._action_lock:
            if self._action_client is None:
                self._action_client = self._new_client()
            try:
                return call(self._action_client)
            except DaemonUnavailable as e:
                self._action_client.close()
                self._action_client = None
                raise ConnectionLost(str(e)) from None

    def show(self, job: int) -> JobDetail:
        return self._ask(lambda c: c.show(job))

    def worker_log(self, job: int, offset: int | None = None) -> WorkerLogReply:
        return self._ask(lambda c: c.worker_log(job, offset))

    def resources(self) -> ResourcesReply:
        return self._ask(lambda c: c.resources())

    def _clone(self, c: DaemonClient, action: Action) -> ActionResult:
        detail = c.show(action.job)
        try:
            data = clone_config(detail.config, list(action.overrides), action.job)
        except ConfigError as e:
            return ActionResult(False, str(e))
        row = c.submit(data, priority=detail.summary.priority, source=f"clone of job {action.job}")
        return ActionResult(True, f"{action.job}: cloned as job {row.id} ({row.name}); now {row.state}")

    def send(self, action: Action) -> ActionResult:
        with self._action_lock:
            if self._action_client is None:
                self._action_client = self._new_client()
            c = self._action_client
            try:
                if action.kind == "clone":
                    return self._clone(c, action)
                if action.kind == "stop":
                    row, verb = c.stop(action.job), "stop requested"
                elif action.kind == "cancel":
                    row, verb = c.cancel(action.job), "cancel requested"
                elif action.kind == "checkpoint":
                    row, verb = c.checkpoint(action.job), "checkpoint requested"
                elif action.kind == "rollback":
                    row = c.rollback(action.job, int(action.step or 0), resume=action.resume)
                    verb = f"rollback to step {action.step} requested" + (
                        ", then resume" if action.resume else ""
                    )
                else:
                    row = c.set_priority(action.job, int(action.priority or 0))
                    verb = f"priority {row.priority}"
            except DaemonUnavailable as e:
                self._action_client.close()
                self._action_client = None
                raise ConnectionLost(str(e)) from None
            except DaemonError as e:
                return ActionResult(False, f"{action.job}: {e} ({e.code})")
            return ActionResult(True, f"{action.job}: {verb}; now {row.state}")


def open_connection(connect: str | None = None, home: str | None = None) -> DaemonConnection:
    """The connection `dallm-tui` uses; it connects (and reconnects) in the feed thread."""
    return DaemonConnection(connect, home)
