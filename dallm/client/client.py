"""The daemon's client library: what `dallm submit`/`ls`/... and the TUI use to talk to `dallm-daemon`.

    from dallm.client.client import DaemonClient

    with DaemonClient(home=None) as c:            # $DALLM_HOME, else the platform's data dir
        job = c.submit(cfg, priority=0)           # JobSummary (cfg: JobConfig or a config dict)
        c.jobs(); c.show(job.id); c.stop(job.id); c.rollback(job.id, 250, resume=True)
        with c.subscribe(topics=[QUEUE_TOPIC, job_topic(job.id)], since=0) as sub:
            for env in sub:                       # EventEnvelope: seq, prev, topic, job, t, superseded, event
                ...

Connecting: `DaemonClient(endpoint)` with "ipc://..." or "tcp://host:port", else $DALLM_CONNECT,
else the daemon running on `home` (its endpoints are in <home>/run/daemon.json). An IPC socket is
used only in a folder that is ours, not a symlink and 0700 (else DaemonError code "unsafe"). Every
TCP endpoint, loopback included, needs CURVE keys: `server_key` (the daemon's server.key) and
`client_key` (your NAME.key_secret, authorized on the daemon), or $DALLM_SERVER_KEY /
$DALLM_CLIENT_KEY, else the home's own local key pair (readable by the daemon's user only).

Calls block for at most `timeout` seconds and raise `DaemonUnavailable` when the daemon does not
answer (the socket is then rebuilt, so a late reply or a queued request is never taken for a new
one), `DaemonError` (with `.code`: not_found, conflict, invalid_config, bad_request, ...) when it
refuses. A client and a subscription are each for one thread at a time: the TUI keeps one client
for requests and iterates a subscription (which has its own sockets) in a worker thread.

Subscriptions follow the zguide's Clone pattern: subscribe to the live topics, read the history
since `since` from the store, then apply live events, dropping those already seen (seq) and
refilling from history when an event's `prev` shows a gap (slow joiner, PUB high-water-mark drops).
Events arrive without gaps or duplicates, in sequence order per topic; a subscription to every
topic (topics=None) is in daemon-wide sequence order (a refill after a gap on one topic can
otherwise hand out an older event of another topic after a newer one). When idle for
`resync_s` seconds the subscription asks the store for anything newer, so a lost last event is
found too.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import zmq

from dallm.client.home import DaemonPaths, lock_is_held, resolve_home
from dallm.client.transport import event_endpoint, make_curve_client
from dallm.protocol import (
    TERMINAL_STATES,
    CancelRequest,
    CheckpointRequest,
    ErrorReply,
    EventEnvelope,
    HistoryReply,
    HistoryRequest,
    JobDetail,
    JobDetailReply,
    JobListReply,
    JobReply,
    JobSummary,
    ListRequest,
    LogsReply,
    LogsRequest,
    OkReply,
    PingRequest,
    PongReply,
    PriorityRequest,
    ProtocolError,
    ResourcesReply,
    ResourcesRequest,
    RollbackRequest,
    ShowRequest,
    ShutdownRequest,
    StopRequest,
    SubmitRequest,
    WorkerLogReply,
    WorkerLogRequest,
    decode_envelope,
    decode_reply,
    encode_request,
)


class DaemonError(Exception):
    """The daemon refused a request; `code` says why (not_found, conflict, invalid_config, ...)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class DaemonUnavailable(DaemonError):
    def __init__(self, message: str) -> None:
        super().__init__("unavailable", message)


def resolve_endpoints(endpoint: str | None, home: str | Path | None) -> tuple[str, str]:
    """(control, events) endpoints: explicit, $DALLM_CONNECT, or those of the daemon on `home`."""
    endpoint = endpoint or os.environ.get("DALLM_CONNECT") or None
    if endpoint:
        if endpoint.startswith("tcp://"):
            return endpoint, event_endpoint(endpoint)
        if endpoint.startswith("ipc://") and endpoint.endswith("control.ipc"):
            _check_socket_folder(Path(endpoint[len("ipc://") :]).parent)
            return endpoint, endpoint[: -len("control.ipc")] + "events.ipc"
        raise DaemonUnavailable(
            f"cannot use endpoint {endpoint!r} (ipc://.../control.ipc or tcp://HOST:PORT)"
        )
    paths = DaemonPaths(resolve_home(home))
    info = paths.read_info()
    if info is None or not lock_is_held(paths):
        raise DaemonUnavailable(f"no daemon running on {paths.home} (start one with `dallm-daemon start`)")
    _check_socket_folder(paths.state_dir)
    control, events = info["control"][0], info["events"][0]
    if control.startswith("ipc://"):
        _check_socket_folder(Path(control[len("ipc://") :]).parent)
    return control, events


def _check_socket_folder(folder: Path) -> None:
    """Refuse to talk through a folder someone else owns or could write in: a socket there may be
    theirs (a forged daemon that reads our configs and answers with made-up jobs)."""
    from dallm.client.private import folder_problem

    problem = folder_problem(folder, strict=False)  # no one else may write in it: no forged socket
    if problem:
        raise DaemonError("unsafe", f"socket folder {folder} {problem}; refusing to use it")


def home_curve_keys(home: str | Path | None) -> tuple[Path, Path] | None:
    """(server public key, local client secret key) of the daemon on `home`, when this user can read
    them: how the same user's CLI and TUI reach a TCP bind of their own daemon without options."""
    from dallm.client.home import DaemonPaths, resolve_home
    from dallm.client.transport import local_client_key_paths

    keys = DaemonPaths(resolve_home(home)).keys
    server, (_, secret) = keys / "server.key", local_client_key_paths(keys)
    try:
        if server.is_file() and secret.is_file() and os.access(secret, os.R_OK):
            return server, secret
    except OSError:
        pass
    return None


class DaemonClient:
    def __init__(
        self,
        endpoint: str | None = None,
        *,
        home: str | Path | None = None,
        timeout: float = 10.0,
        server_key: str | Path | None = None,
        client_key: str | Path | None = None,
    ) -> None:
        self.endpoint, self.events_endpoint = resolve_endpoints(endpoint, home)
        self.timeout = timeout
        self.server_key = server_key or os.environ.get("DALLM_SERVER_KEY")
        self.client_key = client_key or os.environ.get("DALLM_CLIENT_KEY")
        if self.endpoint.startswith("tcp://") and not (self.server_key and self.client_key):
            found = home_curve_keys(home)
            if found is None:
                raise DaemonUnavailable(
                    f"{self.endpoint}: a TCP endpoint needs CURVE keys (server_key and client_key, "
                    "or $DALLM_SERVER_KEY and $DALLM_CLIENT_KEY; `dallm-daemon keys --client NAME`)"
                )
            self.server_key, self.client_key = found
        self.ctx = zmq.Context.instance()
        self._ids = itertools.count(1)
        self._sock: zmq.Socket | None = None

    # --- plumbing -----------------------------------------------------------------------------

    def _secure(self, sock: zmq.Socket) -> None:
        if self.endpoint.startswith("tcp://"):
            assert self.server_key and self.client_key  # __init__ refuses a TCP endpoint without keys
            make_curve_client(sock, self.server_key, self.client_key)

    def _socket(self) -> zmq.Socket:
        if self._sock is None:
            s = self.ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            self._secure(s)
            s.connect(self.endpoint)
            self._sock = s
        return self._sock

    def _reset(self) -> None:
        if self._sock is not None:
            self._sock.close(0)
            self._sock = None

    def request(self, req: Any, timeout: float | None = None) -> Any:
        """Send one request, return its reply (a protocol *Reply); DaemonError when refused."""
        sock = self._socket()
        req_id = next(self._ids)
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        sock.send(encode_request(req_id, req))
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not sock.poll(int(left * 1000) + 1, zmq.POLLIN):
                if time.monotonic() < deadline:
                    continue
                self._reset()
                raise DaemonUnavailable(
                    f"no answer from the daemon at {self.endpoint} within {self.timeout:g} s"
                )
            frames = sock.recv_multipart()
            try:
                rid, rep = decode_reply(frames)
            except ProtocolError as e:
                raise DaemonError(e.code, f"cannot read the daemon's reply: {e}") from None
            if rid != req_id:
                continue  # the late answer to a request that timed out
            if isinstance(rep, ErrorReply):
                raise DaemonError(rep.code, rep.message)
            return rep

    def close(self) -> None:
        self._reset()

    def __enter__(self) -> DaemonClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- requests -----------------------------------------------------------------------------

    def ping(self, timeout: float | None = None) -> PongReply:
        return self.request(PingRequest(), timeout)

    def submit(
        self,
        config: Any,
        *,
        priority: int = 0,
        retries: int = 0,
        source: str = "config",
        config_dir: str | Path | None = None,
    ) -> JobSummary:
        """config_dir: the folder of the config file; over IPC the job may use paths under it."""
        data = config if isinstance(config, dict) else config.model_dump(mode="json")
        folder = str(Path(config_dir).resolve()) if config_dir is not None else None
        rep: JobReply = self.request(
            SubmitRequest(config=data, priority=priority, retries=retries, source=source, config_dir=folder)
        )
        return rep.job

    def jobs(self, states: list[str] | None = None, limit: int | None = None) -> list[JobSummary]:
        rep: JobListReply = self.request(ListRequest(states=states, limit=limit))  # type: ignore[arg-type]
        return rep.jobs

    def show(self, job: int | str) -> JobDetail:
        rep: JobDetailReply = self.request(ShowRequest(job=str(job)))
        return rep.detail

    def summary(self, job: int | str) -> JobSummary:
        return self.show(job).summary

    def history(
        self,
        since: int = 0,
        topics: list[str] | None = None,
        *,
        limit: int = 5000,
        kinds: list[str] | None = None,
        include_png: bool = True,
    ) -> HistoryReply:
        """One page of stored events with seq > since (see `HistoryReply.more`)."""
        req = HistoryRequest(since=since, topics=topics, limit=limit, kinds=kinds, include_png=include_png)
        return self.request(req)

    def history_all(
        self, since: int = 0, topics: list[str] | None = None, **kw: Any
    ) -> tuple[list[EventEnvelope], int]:
        """Every stored event with seq > since (all pages), and the head seq when read."""
        out: list[EventEnvelope] = []
        while True:
            rep = self.history(since, topics, **kw)
            out += rep.events
            if not rep.more or not rep.events:
                return out, rep.head
            since = rep.events[-1].seq

    def logs(self, job: int | str, since: int = 0) -> LogsReply:
        return self.request(LogsRequest(job=str(job), since=since))

    def worker_log(
        self, job: int | str, offset: int | None = None, max_bytes: int | None = None
    ) -> WorkerLogReply:
        """The tail of the job's worker log (offset None), or what was written since `offset`."""
        more = {} if max_bytes is None else {"max_bytes": max_bytes}
        return self.request(WorkerLogRequest(job=str(job), offset=offset, **more))

    def resources(self) -> ResourcesReply:
        """Host, GPUs and running jobs as the daemon samples them now."""
        return self.request(ResourcesRequest())

    def stop(self, job: int | str) -> JobSummary:
        return self.request(StopRequest(job=str(job))).job

    def rollback(self, job: int | str, step: int, resume: bool = False) -> JobSummary:
        return self.request(RollbackRequest(job=str(job), step=step, resume=resume)).job

    def cancel(self, job: int | str) -> JobSummary:
        return self.request(CancelRequest(job=str(job))).job

    def checkpoint(self, job: int | str) -> JobSummary:
        """Ask a running job to write a checkpoint at its next step."""
        return self.request(CheckpointRequest(job=str(job))).job

    def set_priority(self, job: int | str, priority: int) -> JobSummary:
        return self.request(PriorityRequest(job=str(job), priority=priority)).job

    def shutdown(self) -> str:
        rep: OkReply = self.request(ShutdownRequest())
        return rep.message

    def wait(
        self,
        job: int | str,
        timeout: float | None = None,
        on_update: Callable[[JobSummary], None] | None = None,
        poll_s: float = 0.25,
    ) -> JobSummary:
        """Block until the job is finished, stopped, stopped-early, failed or cancelled; its final row.
        Rides out a daemon restart (unavailable answers are retried until `timeout`)."""
        end = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                s = self.summary(job)
                if on_update is not None:
                    on_update(s)
                if s.state in TERMINAL_STATES:
                    return s
            except DaemonUnavailable:
                pass
            if end is not None and time.monotonic() > end:
                raise TimeoutError(f"job {job} still not done after {timeout:g} s")
            time.sleep(poll_s)

    def subscribe(self, topics: list[str] | None = None, since: int | None = 0, **kw: Any) -> Subscription:
        """Events on `topics` (None: all) with seq > since; since=None: only live events from now."""
        return Subscription(self, topics, since, **kw)


class Subscription:
    """Snapshot-then-live events in sequence order, no gaps or duplicates (see the module doc)."""

    def __init__(
        self,
        client: DaemonClient,
        topics: list[str] | None,
        since: int | None,
        resync_s: float = 2.0,
        include_png: bool = True,
    ) -> None:
        self.topics = topics
        self.include_png = include_png
        self.resync_s = resync_s
        self._client = DaemonClient(
            client.endpoint,
            timeout=client.timeout,
            server_key=client.server_key,
            client_key=client.client_key,
        )
        self.sub = self._client.ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.LINGER, 0)
        self.sub.setsockopt(zmq.RCVHWM, 100_000)
        self._client._secure(self.sub)
        for topic in topics if topics is not None else [""]:
            self.sub.setsockopt(zmq.SUBSCRIBE, topic.encode())
        self.sub.connect(client.events_endpoint)
        self.ready: collections.deque[EventEnvelope] = collections.deque()
        self.last: dict[str, int] = {}
        self.high = 0  # the highest seq taken in
        self.floor = 0
        self.last_seq = 0  # the seq of the last event handed out
        self._idle_since = time.monotonic()
        if since is None:
            self.floor = self._client.ping().head
        else:
            self.floor = since
            self._refill()

    def _refill(self) -> None:
        events, head = self._client.history_all(self.floor, self.topics, include_png=self.include_png)
        for env in events:
            self._accept(env)
        self.floor = max(self.floor, head)

    def _accept(self, env: EventEnvelope) -> None:
        if env.seq <= self.last.get(env.topic, 0):
            return
        self.last[env.topic] = env.seq
        self.high = max(self.high, env.seq)
        self.ready.append(env)

    def _on_live(self, env: EventEnvelope) -> None:
        if env.seq <= self.floor or env.seq <= self.last.get(env.topic, 0):
            return  # already had it from the store
        if self.topics is None:  # every topic: the daemon-wide seq itself has no gaps
            lost = env.seq > max(self.floor, self.high) + 1
        else:
            lost = env.prev > max(self.floor, self.last.get(env.topic, 0))
        if lost:
            self._refill()  # something was lost between the store and here
        self._accept(env)

    def get(self, timeout: float | None = None) -> EventEnvelope | None:
        """The next event, waiting at most `timeout` seconds (None: forever); None on timeout.
        Raises DaemonUnavailable when a gap must be refilled from the store and the daemon does not
        answer (close the subscription and subscribe again with since=last_seq)."""
        end = None if timeout is None else time.monotonic() + timeout
        while not self.ready:
            wait = self.resync_s if end is None else min(self.resync_s, max(0.0, end - time.monotonic()))
            if self.sub.poll(int(wait * 1000), zmq.POLLIN):
                while True:
                    try:
                        frames = self.sub.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    try:
                        self._on_live(decode_envelope(frames))
                    except ProtocolError:
                        continue
                self._idle_since = time.monotonic()
            elif time.monotonic() - self._idle_since >= self.resync_s:
                self._idle_since = time.monotonic()
                with contextlib.suppress(DaemonUnavailable):
                    self._refill()
            if end is not None and time.monotonic() >= end and not self.ready:
                return None
        return self._pop()

    def _pop(self) -> EventEnvelope:
        env = self.ready.popleft()
        self.last_seq = env.seq
        return env

    def drain(self, timeout: float = 0.0) -> list[EventEnvelope]:
        """Every event available now (waiting up to `timeout` for the first)."""
        first = self.get(timeout)
        if first is None:
            return []
        out = [first]
        while self.ready:
            out.append(self._pop())
        return out

    def __iter__(self) -> Iterator[EventEnvelope]:
        while True:
            env = self.get(None)
            if env is not None:
                yield env

    def close(self) -> None:
        self.sub.close(0)
        self._client.close()

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
