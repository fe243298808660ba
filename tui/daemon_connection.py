"""`Connection` over the daemon's client library (`dallm.client.client`).

Two clients, as the client library asks (each is for one thread): one for the link thread (queue,
histories, heartbeat) with the live subscription, one for actions sent from thread workers.
The subscription takes every topic live from the moment of connecting (rows of every job stay
current); a job's history is read from the store when the user first looks at it, and again since
the last seq after a reconnect.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TypeVar

from dallm.client.client import DaemonClient, DaemonError, DaemonUnavailable, Subscription
from dallm.client.home import resolve_home
from dallm.config import ConfigError
from dallm.protocol import EventEnvelope, JobDetail, JobSummary, ResourcesReply, WorkerLogReply, job_topic
from dallm.tui.connection import Action, ConnectionLost, Outcome, clone_config

T = TypeVar("T")

HEARTBEAT_S = 2.0  # ping the daemon when the event stream was quiet this long


class DaemonConnection:
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

    def _clone(self, c: DaemonClient, action: Action) -> Outcome:
        detail = c.show(action.job)
        try:
            data = clone_config(detail.config, list(action.overrides), action.job)
        except ConfigError as e:
            return Outcome(False, str(e))
        row = c.submit(data, priority=detail.summary.priority, source=f"clone of job {action.job}")
        return Outcome(True, f"{action.job}: cloned as job {row.id} ({row.name}); now {row.state}")

    def send(self, action: Action) -> Outcome:
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
                return Outcome(False, f"{action.job}: {e} ({e.code})")
            return Outcome(True, f"{action.job}: {verb}; now {row.state}")


def open_connection(connect: str | None = None, home: str | None = None) -> DaemonConnection:
    """The connection `dallm-tui` uses; it connects (and reconnects) in the link thread."""
    return DaemonConnection(connect, home)
