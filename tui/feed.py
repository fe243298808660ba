"""The feed: the thread that keeps the TUI in step with the daemon, over a `Connection`
(connection.py), reporting to the app as Textual messages.

It runs in a Textual thread worker (the UI thread never touches the network): connect and subscribe,
list the queue, load the history of the jobs the user looks at, then pass live events on in batches.
When the daemon goes away it says so, retries with exponential backoff and, once back, lists the queue
again and backfills each tracked job's history since the last sequence number it saw.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable

from textual.message import Message

from dallm.protocol import EventEnvelope, JobSummary
from dallm.tui.connection import Connection, ConnectionLost


class DaemonFeed:
    """Drives a `Connection` from one thread and reports what happened as Textual messages."""

    class Connected(Message):
        def __init__(self, endpoint: str) -> None:
            super().__init__()
            self.endpoint = endpoint

    class Disconnected(Message):
        def __init__(self, endpoint: str, error: str, retry_in: float) -> None:
            super().__init__()
            self.endpoint, self.error, self.retry_in = endpoint, error, retry_in

    class JobsListed(Message):
        def __init__(self, jobs: list[JobSummary]) -> None:
            super().__init__()
            self.jobs = jobs

    class HistoryLoaded(Message):
        def __init__(self, job: int, envelopes: list[EventEnvelope]) -> None:
            super().__init__()
            self.job, self.envelopes = job, envelopes

    class EventsReceived(Message):
        def __init__(self, envelopes: list[EventEnvelope]) -> None:
            super().__init__()
            self.envelopes = envelopes

    def __init__(
        self,
        conn: Connection,
        post: Callable[[Message], object],
        *,
        poll_timeout: float = 0.25,
        backoff: tuple[float, float] = (0.5, 10.0),
    ) -> None:
        self.conn = conn
        self.post = post
        self.poll_timeout = poll_timeout
        self.backoff = backoff
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._relist = threading.Event()
        self._wanted: queue.SimpleQueue[int] = queue.SimpleQueue()
        self._tracked: dict[int, int] = {}  # job -> last seq seen (jobs whose history is loaded)
        self.connected = False

    # -- called from the UI thread --------------------------------------------------------------

    def want_history(self, job: int) -> None:
        """Load `job`'s history (once) and keep it backfilled across reconnects."""
        self._wanted.put(job)

    def refresh_jobs(self) -> None:
        """List the queue again (after an action, say) at the next turn of the loop."""
        self._relist.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    # -- the thread -----------------------------------------------------------------------------

    def run(self) -> None:
        delay = self.backoff[0]
        while not self._stop.is_set():
            error = ""
            try:
                self._session()
            except ConnectionLost as e:
                error = str(e) or "connection lost"
            except Exception as e:  # the daemon spoke nonsense, or a bug: report it and start over
                error = f"{type(e).__name__}: {e}"
            with contextlib.suppress(Exception):
                self.conn.close()
            if self._stop.is_set():
                break
            if self.connected:
                delay = self.backoff[0]
            self.connected = False
            self.post(self.Disconnected(self.conn.endpoint, error, delay))
            self._wake.clear()
            self._wake.wait(delay)
            delay = min(delay * 2, self.backoff[1])

    def _session(self) -> None:
        self.conn.connect()  # subscribe first, then snapshot: nothing falls in between
        self.post(self.JobsListed(self.conn.list_jobs()))
        for job, since in list(self._tracked.items()):
            self._load(job, since)
        self.connected = True
        self.post(self.Connected(self.conn.endpoint))
        while not self._stop.is_set():
            while True:
                try:
                    job = self._wanted.get_nowait()
                except queue.Empty:
                    break
                if job not in self._tracked:
                    self._tracked[job] = 0  # tracked first: a load cut short is redone after a reconnect
                    self._load(job, 0)
            if self._relist.is_set():
                self._relist.clear()
                self.post(self.JobsListed(self.conn.list_jobs()))
            envelopes = self.conn.poll_events(self.poll_timeout)
            if envelopes:
                for env in envelopes:
                    if env.job in self._tracked:
                        self._tracked[env.job] = max(self._tracked[env.job], env.seq)
                self.post(self.EventsReceived(envelopes))

    def _load(self, job: int, since: int) -> None:
        envelopes = self.conn.job_history(job, since)
        last = max((e.seq for e in envelopes), default=since)
        self._tracked[job] = max(self._tracked.get(job, 0), last)
        self.post(self.HistoryLoaded(job, envelopes))
