# ruff: noqa: F811 - pytest fixtures imported from daemon_helpers
"""Issue 13: replies are bounded. A history page stops at MAX_HISTORY_PAGE events or MAX_REPLY_BYTES,
and a client that never reads its replies does not grow the daemon's memory past the stated bound
(CONTROL_SNDHWM x MAX_REPLY_BYTES) while others are served as usual."""

from __future__ import annotations

import time
from pathlib import Path

import psutil
import zmq
from daemon_helpers import daemons, home  # noqa: F401

from dallm.client.home import DaemonPaths
from dallm.daemon.limits import CONTROL_SNDHWM, MAX_HISTORY_PAGE, MAX_REPLY_BYTES
from dallm.daemon.store import Store
from dallm.protocol import HistoryRequest, LogEvent, encode_request

MESSAGE = "x" * 1000


def fill_store(home: Path, events: int) -> None:
    """`events` stored log events of ~1 kB (a store as a long job leaves it), written directly."""
    paths = DaemonPaths(home)
    paths.prepare()
    store = Store(paths.db)
    job = store.add_job("big", {"name": "big"}, 0, 1, 0)
    store.transition(job, "finished", "done")
    data = LogEvent(message=MESSAGE).model_dump_json()
    base = store.head()
    rows = [(base + i + 1, base + i, job, "job/1/", "log", None, 0.0, data, None) for i in range(events)]
    store.add_events(rows)
    store.close()


def rss_mb(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 2**20


def test_history_pages_are_bounded(daemons, home: Path) -> None:
    fill_store(home, 6000)
    d = daemons()
    with d.client() as c:
        page = c.history(0, limit=50_000)
        assert page.more and len(page.events) < MAX_HISTORY_PAGE
        assert len(page.events) * len(MESSAGE) <= MAX_REPLY_BYTES
        events, _ = c.history_all(0, ["job/1/"])
        assert len(events) == 6000  # paging reaches every event


def test_a_client_that_never_reads_costs_bounded_memory(daemons, home: Path) -> None:
    fill_store(home, 6000)
    d = daemons()
    assert d.proc is not None
    before = rss_mb(d.proc.pid)
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.RCVHWM, 1)
    s.setsockopt(zmq.RCVBUF, 4096)
    s.connect(DaemonPaths(home).endpoint("control"))
    frame = encode_request(1, HistoryRequest(since=0, limit=MAX_HISTORY_PAGE))
    try:
        for _ in range(1500):  # 1500 pages of 256 KiB: 375 MiB if the daemon kept them all
            s.send(frame)
        peak, steady, end = before, 0, time.monotonic() + 60
        while steady < 6 and time.monotonic() < end:  # until the flood is worked through
            time.sleep(0.5)
            now = rss_mb(d.proc.pid)
            steady = steady + 1 if now <= peak + 1 else 0
            peak = max(peak, now)
        with d.client() as c:
            assert c.ping()  # others are served as usual
        bound = CONTROL_SNDHWM * MAX_REPLY_BYTES / 2**20
        assert peak - before < bound + 60, (
            f"daemon grew {peak - before:.0f} MiB with a client that never reads"
        )
    finally:
        s.close(0)
