# ruff: noqa: F811 - pytest fixtures imported from daemon_helpers
"""The client library: requests with timeouts, and subscriptions (snapshot, then live, in order,
without gaps or duplicates, across lost frames and a daemon restart)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from daemon_helpers import config, daemons, home, wait_step  # noqa: F401

from dallm.client.client import DaemonClient, DaemonUnavailable, Subscription
from dallm.protocol import QUEUE_TOPIC, TERMINAL_STATES, EventEnvelope, JobStateEvent, job_topic


def follow(sub: Subscription, *jobs: int, timeout: float = 60.0) -> list[EventEnvelope]:
    """Events until every one of `jobs` has reached a terminal state."""
    out: list[EventEnvelope] = []
    waiting = set(jobs)
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        env = sub.get(timeout=1.0)
        if env is None:
            continue
        out.append(env)
        ev = env.event
        if isinstance(ev, JobStateEvent) and ev.job.state in TERMINAL_STATES:
            waiting.discard(ev.job.id)
            if not waiting:
                return out
    raise AssertionError(f"jobs {waiting} did not end; got {len(out)} events")


def check_in_order(events: list[EventEnvelope], globally: bool = False) -> None:
    """No duplicates, no gaps, in seq order per topic (and across topics when `globally`)."""
    seqs = [e.seq for e in events]
    assert len(seqs) == len(set(seqs)), "duplicates"
    if globally:
        assert seqs == sorted(seqs), "disorder"
    last: dict[str, int] = {}
    for e in events:
        assert e.seq > last.get(e.topic, 0), f"disorder on {e.topic}"
        assert e.prev == last.get(e.topic, e.prev), f"gap before {e.seq} on {e.topic}"
        last[e.topic] = e.seq


def test_join_mid_run_gets_snapshot_then_live(daemons) -> None:
    d = daemons(step_s=0.01)
    with d.client() as c:
        job = c.submit(config("a", steps=150, every=50, samples={"every": 25, "prompts": ["p"]}))
        wait_step(c, job.id, 40)
        topics = [QUEUE_TOPIC, job_topic(job.id)]
        with c.subscribe(topics, since=0) as sub:
            got = follow(sub, job.id)
        check_in_order(got)
        stored, _ = c.history_all(0, topics)
        assert sorted(e.seq for e in got) == [e.seq for e in stored if e.seq <= max(e.seq for e in got)]
        assert [e.event.step for e in got if e.event.kind == "metrics"] == list(range(1, 151))
        assert all(e.event.png for e in got if e.event.kind == "sample")


class Lossy(Subscription):
    """Drops every third live frame, as a PUB at its high-water mark would."""

    n = 0

    def _on_live(self, env: EventEnvelope) -> None:
        self.n += 1
        if self.n % 3:
            super()._on_live(env)


def test_lost_live_frames_are_refilled_from_the_store(daemons) -> None:
    d = daemons(step_s=0.005)
    with d.client() as c:
        with Lossy(c, None, since=None) as sub:
            job = c.submit(config("a", steps=100, every=50))
            got = follow(sub, job.id)
        check_in_order(got, globally=True)
        assert [e.event.step for e in got if e.event.kind == "metrics"] == list(range(1, 101))
        assert sub.n > 0


def test_all_topics_have_consecutive_seqs_with_two_jobs(daemons) -> None:
    d = daemons("--max-jobs", "2", step_s=0.005)
    with d.client() as c, c.subscribe(None, since=0) as sub:
        a = c.submit(config("a", steps=60))
        b = c.submit(config("b", steps=50))
        got = follow(sub, a.id, b.id)
        check_in_order(got, globally=True)
        seqs = [e.seq for e in got]
        assert seqs == list(range(1, len(seqs) + 1))
        assert {e.job for e in got} == {a.id, b.id}


def test_subscription_rides_out_a_daemon_restart(daemons) -> None:
    d = daemons(step_s=0.02)
    with d.client() as c:
        job = c.submit(config("a", steps=50, every=10))
        sub = c.subscribe([QUEUE_TOPIC, job_topic(job.id)], since=0, resync_s=0.5)
        wait_step(c, job.id, 15)
    d.kill9()
    d2 = daemons(step_s=0.01)
    try:
        got = follow(sub, job.id)
    finally:
        sub.close()
    check_in_order(got)
    with d2.client() as c:
        live = [e.event.step for e in got if e.event.kind == "metrics" and not e.superseded]
        assert live[-1] == 50 and c.summary(job.id).state == "finished"


def test_unavailable_daemon(home: Path, daemons) -> None:
    with pytest.raises(DaemonUnavailable, match="no daemon running"):
        DaemonClient(home=home)
    home.mkdir(parents=True)
    endpoint = f"ipc://{home}/control.ipc"
    c = DaemonClient(endpoint, timeout=0.3)
    t0 = time.monotonic()
    with pytest.raises(DaemonUnavailable, match="no answer"):
        c.ping()
    assert time.monotonic() - t0 < 2
    d = daemons()
    with d.client() as c2:
        assert c2.ping().home == str(home)
        assert c2.history(0).head == c2.ping().head
